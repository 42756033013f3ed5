"""``bentoml serve`` with a runtime folder of this server's own.

BentoML keeps every server's Prometheus multiprocess files in one folder under its home and
empties it whenever a server starts (even one that then fails on a busy port), so a second
server on the same host would silently replace or erase the first one's metrics, and the
feedback store that lives beside them. ``imgclf serve`` runs ``bentoml serve`` through this
module instead: the folder is a new temporary one per server (the same override BentoML's
own pytest plugin makes), handed to every worker as ``PROMETHEUS_MULTIPROC_DIR``, and removed
when the server exits.

    python -m serving.web.launch serve serving.service:ImageClassifier --port 3000
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from serving.web.supervision import SERVER_PID_VARIABLE


def main() -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.cli import cli

    os.environ[SERVER_PID_VARIABLE] = str(os.getpid())  # the workers' parent, to die with
    folder = tempfile.mkdtemp(prefix="imgclf-server-")
    BentoMLContainer.prometheus_multiproc_dir.set(folder)
    atexit.register(shutil.rmtree, folder, True)
    sys.argv[0] = "bentoml"
    sys.exit(cli())


if __name__ == "__main__":
    main()
