"""Every Prometheus metric the service exports. Only this module creates metrics.

Naming: prefix ``imgclf_``, base units, ``_total`` counters, histograms (not summaries) with
buckets for this workload, bounded labels (endpoints and error reasons are fixed sets; class
names come from the model's metadata, never from a request). BentoML runs several processes
with ``PROMETHEUS_MULTIPROC_DIR`` set: counters and histograms add up across them, and every
gauge states how its processes combine.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

#: Endpoint label values: our routes, the Open Inference Protocol's by route template, and
#: its gRPC calls (``serving.web.oip_grpc``).
ENDPOINTS = (
    "predict",
    "predict_batch",
    "explain",
    "metadata",
    "v2_server_metadata",
    "v2_health",
    "v2_model_ready",
    "v2_model_metadata",
    "v2_model_config",
    "v2_infer",
    "feedback",
    "feedback_report",
    "grpc_server_metadata",
    "grpc_model_ready",
    "grpc_model_metadata",
    "grpc_model_config",
    "grpc_infer",
)

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DECODE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
INFERENCE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Waiting for a batch spans the same range as running one.
QUEUE_WAIT_BUCKETS = INFERENCE_BUCKETS
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
ENTROPY_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, with one write per non-empty bucket rather
    than per value: each write is a locked mmap update with several worker processes, and the
    per-image histograms would otherwise cost more than the rest of monitoring together. The
    buckets are found in one ``searchsorted`` (``observe`` counts a value in the first bucket
    whose upper bound is >= it; a NaN, in none). Relies on prometheus_client's
    ``_upper_bounds``, ``_buckets`` and ``_sum`` (0.26, pinned; tests/monitoring/
    test_metrics.py checks it against ``observe``)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if not len(values):
        return
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket in np.flatnonzero(counts).tolist():
        histogram._buckets[bucket].inc(int(counts[bucket]))
    histogram._sum.inc(float(values.sum()))


REQUESTS = Counter(
    "imgclf_requests_total",
    "HTTP requests answered, by endpoint and status code.",
    ["endpoint", "code"],
)
REQUEST_ERRORS = Counter(
    "imgclf_request_errors_total",
    "Requests refused or failed, by endpoint and reason.",
    ["endpoint", "reason"],
)
REQUEST_DURATION = Histogram(
    "imgclf_request_duration_seconds",
    "Whole request time in the HTTP worker, by endpoint.",
    ["endpoint"],
    buckets=REQUEST_BUCKETS,
)
DECODE_DURATION = Histogram(
    "imgclf_decode_duration_seconds",
    "Decode and preprocess time per image.",
    buckets=DECODE_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "imgclf_inference_duration_seconds",
    "ONNX Runtime time per batch.",
    buckets=INFERENCE_BUCKETS,
)
BATCH_SIZE = Histogram(
    "imgclf_batch_size",
    "Images per ONNX Runtime batch (after adaptive batching).",
    buckets=BATCH_BUCKETS,
)
REQUESTS_IN_PROGRESS = Gauge(
    "imgclf_requests_in_progress",
    "Requests being answered (probes and /metrics aside), summed over the live workers; "
    "written once a second.",
    multiprocess_mode="livesum",
)
BATCH_QUEUE = Gauge(
    "imgclf_batch_queue_requests",
    "Requests waiting for a batch, summed over the live workers.",
    multiprocess_mode="livesum",
)
BATCH_QUEUE_WAIT = Histogram(
    "imgclf_batch_queue_wait_seconds",
    "Time a request waited between joining the queue and its batch starting to run.",
    buckets=QUEUE_WAIT_BUCKETS,
)
WORKER_DEATHS = Counter(
    "imgclf_worker_deaths_total",
    "Worker processes that ended without being asked to (killed, out of memory, crashed), "
    "counted by the worker that replaced them.",
)
WORKER_START_FAILURES = Counter(
    "imgclf_worker_start_failures_total",
    "Worker processes that could not start (their model, their settings), counted by the "
    "worker that tried again after them; each waits longer before exiting, up to a minute.",
)
READY = Gauge(
    "imgclf_ready",
    "1 when every live worker is loaded and warmed up and not draining, else 0.",
    multiprocess_mode="livemin",
)
WORKERS = Gauge(
    "imgclf_workers",
    "Worker processes the server is configured to run.",
    multiprocess_mode="max",
)
WORKERS_READY = Gauge(
    "imgclf_workers_ready",
    "Worker processes that are loaded, warmed up and not draining (below imgclf_workers "
    "while a dead worker is being replaced).",
    multiprocess_mode="livesum",
)
MODEL_LOAD_SECONDS = Gauge(
    "imgclf_model_load_seconds",
    "Seconds a worker took to verify and load the model (the slowest worker).",
    multiprocess_mode="max",
)
WARM_UP_SECONDS = Gauge(
    "imgclf_warm_up_seconds",
    "Seconds a worker took to run every batch size once (the slowest worker).",
    multiprocess_mode="max",
)
WARMED_BATCH_SIZE = Gauge(
    "imgclf_warmed_batch_size",
    "Batch sizes ONNX Runtime is called with, each run once before ready (value 1).",
    ["batch_size"],
    multiprocess_mode="max",
)
EXECUTION_PROVIDER = Gauge(
    "imgclf_execution_provider_info",
    "The ONNX Runtime provider in use and the options we set (value 1).",
    ["provider", "device_id", "cudnn_conv_algo_search", "tf32"],
    multiprocess_mode="max",
)
PREDICTIONS = Counter(
    "imgclf_predictions_total",
    "Predictions by top-1 class (class names from the model).",
    ["class"],
)
CONFIDENCE = Histogram(
    "imgclf_prediction_confidence",
    "Top-1 probability of each prediction.",
    buckets=CONFIDENCE_BUCKETS,
)
ENTROPY = Histogram(
    "imgclf_prediction_entropy",
    "Entropy of each prediction's probabilities, in nats.",
    buckets=ENTROPY_BUCKETS,
)
BRIGHTNESS = Histogram(
    "imgclf_input_brightness_ratio",
    "Mean model-input intensity per image, fraction of 255.",
    buckets=FRACTION_BUCKETS,
)
CONTRAST = Histogram(
    "imgclf_input_contrast_ratio",
    "Standard deviation of model-input intensity per image, fraction of 255.",
    buckets=FRACTION_BUCKETS,
)
MODEL_INFO = Gauge(
    "imgclf_model_info",
    "The model being served (value 1).",
    ["name", "version", "provider", "precision"],
    multiprocess_mode="max",
)
DRIFT_PSI = Gauge(
    "imgclf_drift_psi",
    "Population stability index of the live window against the reference.",
    ["signal"],
    multiprocess_mode="mostrecent",
)
DRIFT_KS = Gauge(
    "imgclf_drift_ks_statistic",
    "Two-sample Kolmogorov-Smirnov statistic against the reference.",
    ["signal"],
    multiprocess_mode="mostrecent",
)
DRIFT_JS = Gauge(
    "imgclf_drift_js_distance",
    "Jensen-Shannon distance (base 2) of the binned signal against the reference.",
    ["signal"],
    multiprocess_mode="mostrecent",
)
DRIFT_BIN = Counter(
    "imgclf_drift_signal_bin_total",
    "Predictions by the reference bin their drift signal fell in (bin: the class name, or the "
    "index of the reference's bin, 0 the lowest) and the version that answered: summed over "
    "every worker and replica, the fleet's distribution, which the recording rules compare "
    "with the reference's.",
    ["signal", "bin", "version"],
)
DRIFT_REFERENCE_BIN = Gauge(
    "imgclf_drift_reference_bin_ratio",
    "Each version's reference profile: its fraction of predictions in each bin of each drift "
    "signal.",
    ["signal", "bin", "version"],
    multiprocess_mode="max",
)
DRIFT_WINDOW = Gauge(
    "imgclf_drift_window_samples",
    "Predictions in the live drift window (the fullest worker's: each worker keeps its own, "
    "and only a window of at least the minimum size publishes drift).",
    multiprocess_mode="livemax",
)
DRIFT_WINDOW_CAPACITY = Gauge(
    "imgclf_drift_window_capacity_samples",
    "Size of the live drift window when full.",
    multiprocess_mode="max",
)
DRIFT_MIN_SAMPLES = Gauge(
    "imgclf_drift_min_samples",
    "Window size below which drift is not reported.",
    multiprocess_mode="max",
)
DRIFT_REFERENCE = Gauge(
    "imgclf_drift_reference_samples",
    "Held-out images behind the reference profile.",
    multiprocess_mode="max",
)
DRIFT_LAST_COMPUTED = Gauge(
    "imgclf_drift_last_computed_timestamp_seconds",
    "Unix time of the last drift computation (0: never).",
    multiprocess_mode="max",
)
DRIFT_THRESHOLD = Gauge(
    "imgclf_drift_threshold",
    "Each drift statistic's threshold for the live window's size (calibrated on the "
    "reference at export, or the fixed bands). statistic: psi, js_distance, ks or "
    "domain_classifier_auc (signal embedding); level: warning or critical.",
    ["signal", "statistic", "level"],
    multiprocess_mode="mostrecent",
)
WINDOW_MEAN_CONFIDENCE = Gauge(
    "imgclf_window_mean_confidence_ratio",
    "Mean top-1 confidence over the live drift window: a label-free estimate of accuracy "
    "when the model is calibrated (compare imgclf_reference_calibration_error_ratio).",
    multiprocess_mode="mostrecent",
)
ESTIMATED_ACCURACY = Gauge(
    "imgclf_estimated_accuracy_ratio",
    "Label-free accuracy estimate of the live drift window: temperature-calibrated "
    "probabilities summed into an expected confusion matrix (CBPE), images outside the "
    "reference's embedding support counted at chance.",
    multiprocess_mode="mostrecent",
)
ESTIMATED_PRECISION = Gauge(
    "imgclf_estimated_precision_ratio",
    "Label-free estimate of each predicted class's precision over the live drift window.",
    ["class"],
    multiprocess_mode="mostrecent",
)
ESTIMATED_RECALL = Gauge(
    "imgclf_estimated_recall_ratio",
    "Label-free estimate of each true class's recall over the live drift window.",
    ["class"],
    multiprocess_mode="mostrecent",
)
OUT_OF_SUPPORT = Gauge(
    "imgclf_window_out_of_support_ratio",
    "Share of the live drift window whose embedding lies farther from every reference image "
    "than 99.9 % of reference images lie from their nearest neighbour.",
    multiprocess_mode="mostrecent",
)
DRIFT_DOMAIN_AUC = Gauge(
    "imgclf_drift_domain_classifier_auc",
    "ROC AUC of a classifier told to tell the live window's distinct embeddings from the "
    "reference's (0.5: it cannot); thresholds in imgclf_drift_threshold.",
    ["signal"],
    multiprocess_mode="mostrecent",
)
REFERENCE_ACCURACY = Gauge(
    "imgclf_reference_accuracy_ratio",
    "Accuracy on the held-out reference images, measured at export.",
    multiprocess_mode="max",
)
REFERENCE_MEAN_CONFIDENCE = Gauge(
    "imgclf_reference_mean_confidence_ratio",
    "Mean top-1 confidence on the held-out reference images, measured at export.",
    multiprocess_mode="max",
)
REFERENCE_CALIBRATION_ERROR = Gauge(
    "imgclf_reference_calibration_error_ratio",
    "Expected calibration error (15 confidence bins) on the held-out images at export.",
    multiprocess_mode="max",
)
FEEDBACK = Counter(
    "imgclf_feedback_total",
    "Labels matched to a prediction through POST /feedback, by true class, outcome (correct "
    "or incorrect) and the version that made the prediction. Refused feedback is not "
    "counted here.",
    ["class", "outcome", "version"],
)
FEEDBACK_STORE_ERRORS = Counter(
    "imgclf_feedback_store_errors_total",
    "Failures of the feedback store's file, by operation (open, write, read, label) and "
    "reason (disk_full, corrupt, io_error, busy, read_only, cannot_open, other).",
    ["operation", "reason"],
)
FEEDBACK_PREDICTIONS_LOST = Counter(
    "imgclf_feedback_predictions_lost_total",
    "Predictions answered but not written to the feedback store (it failed): labels for them "
    "cannot be matched.",
)
FEEDBACK_IDS_TAKEN = Counter(
    "imgclf_feedback_ids_taken_total",
    "Predictions not kept for feedback because an earlier prediction holds their request id "
    "(a retry, or callers choosing the same X-Request-ID): a label for that id is scored "
    "against the first prediction.",
)
FEEDBACK_ACCURACY = Gauge(
    "imgclf_feedback_accuracy_ratio",
    "Accuracy over the last labelled predictions (see imgclf_feedback_window_samples); "
    "published once at least the minimum number are labelled.",
    multiprocess_mode="mostrecent",
)
FEEDBACK_ESTIMATED_ACCURACY = Gauge(
    "imgclf_feedback_estimated_accuracy_ratio",
    "The label-free estimate over the same labelled predictions as "
    "imgclf_feedback_accuracy_ratio (each prediction's expected correctness when it was "
    "answered).",
    multiprocess_mode="mostrecent",
)
FEEDBACK_ESTIMATE_GAP = Gauge(
    "imgclf_feedback_estimate_gap_ratio",
    "|estimated - realised| accuracy over the last labelled predictions: the continuous "
    "audit of the label-free estimate.",
    multiprocess_mode="mostrecent",
)
FEEDBACK_RECALL = Gauge(
    "imgclf_feedback_recall_ratio",
    "Recall of each true class over the last labelled predictions.",
    ["class"],
    multiprocess_mode="mostrecent",
)
FEEDBACK_WINDOW = Gauge(
    "imgclf_feedback_window_samples",
    "Labelled predictions behind the feedback accuracy (at most the window).",
    multiprocess_mode="mostrecent",
)
FEEDBACK_STORE = Gauge(
    "imgclf_feedback_store_predictions",
    "Predictions kept for delayed labels (shared by all workers).",
    multiprocess_mode="mostrecent",
)
FEEDBACK_STORE_CAPACITY = Gauge(
    "imgclf_feedback_store_capacity_predictions",
    "Most predictions the feedback store keeps.",
    multiprocess_mode="max",
)
ACCURACY_ALERT_MARGIN = Gauge(
    "imgclf_accuracy_alert_margin_ratio",
    "How far accuracy may fall below the held-out accuracy before the alerts fire.",
    multiprocess_mode="max",
)
# -- versions: which one answers, which one shadows it, what each switch did -------------------
SERVED_VERSION = Gauge(
    "imgclf_served_version",
    "The version each live worker serves in each role (live, shadow; 0: no shadow), per pid: "
    "min() and max() over a fleet agree once every worker has taken a switch.",
    ["role"],
    multiprocess_mode="liveall",
)
VERSION_PREDICTIONS = Counter(
    "imgclf_version_predictions_total",
    "Images answered, by the version that answered them.",
    ["version"],
)
VERSION_SWITCHES = Counter(
    "imgclf_version_switches_total",
    "Versions a worker switched to after it had loaded, verified and warmed them, by role.",
    ["role"],
)
VERSION_REFUSALS = Counter(
    "imgclf_version_refusals_total",
    "Versions a worker refused to switch to (hashes, graph, classes or warm-up failed); the "
    "version serving before keeps serving.",
    ["version"],
)
VERSION_REFUSED = Gauge(
    "imgclf_version_refused",
    "1 while a worker refuses a version (until it is published again and loads), else 0.",
    ["version"],
    multiprocess_mode="livemax",
)
SHADOW_IMAGES = Counter(
    "imgclf_shadow_images_total",
    "Copies of live images offered to the shadow version, by outcome: compared, dropped "
    "(the shadow was behind), failed (the shadow raised) or skipped (input it cannot take).",
    ["version", "outcome"],
)
SHADOW_AGREEMENTS = Counter(
    "imgclf_shadow_agreements_total",
    "Compared images where the shadow's top-1 class equals the live version's.",
    ["version"],
)
SHADOW_AGREEMENT = Gauge(
    "imgclf_shadow_agreement_ratio",
    "Top-1 agreement of shadow and live over the shadow window (this worker's).",
    multiprocess_mode="mostrecent",
)
SHADOW_MEAN_CONFIDENCE = Gauge(
    "imgclf_shadow_mean_confidence_ratio",
    "Mean top-1 confidence over the shadow window, of the live and of the shadow answers to "
    "the same images.",
    ["role"],
    multiprocess_mode="mostrecent",
)
SHADOW_WINDOW = Gauge(
    "imgclf_shadow_window_samples",
    "Compared images in the shadow window.",
    multiprocess_mode="mostrecent",
)
SHADOW_DURATION = Histogram(
    "imgclf_shadow_inference_duration_seconds",
    "ONNX Runtime time per shadow batch (off the live requests' path).",
    buckets=INFERENCE_BUCKETS,
)
SHADOW_DRIFT_PSI = Gauge(
    "imgclf_shadow_drift_psi",
    "Population stability index of the shadow's answers over the shadow window against the "
    "shadow version's own reference profile.",
    ["signal"],
    multiprocess_mode="mostrecent",
)
