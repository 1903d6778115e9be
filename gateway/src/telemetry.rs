//! Every metric family the server exports, with its type and HELP text, in
//! one table: described to the recorder at start so that `/metrics` carries
//! HELP for each. Counters end in `_total` as vLLM names them (so a vLLM
//! dashboard works by swapping the `vllm:` prefix); the Triton plane keeps
//! Triton's own names.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

use Kind::{Counter, Gauge, Histogram};

pub const FAMILIES: &[(&str, Kind, &str)] = &[
    // The LLM engine (labelled model_name), as vLLM names them.
    ("switchyard:num_requests_running", Gauge, "Sequences in the running batch."),
    ("switchyard:num_requests_waiting", Gauge, "Requests waiting to be scheduled, preempted ones included."),
    ("switchyard:kv_cache_usage_perc", Gauge, "Share of KV cache blocks held by sequences (0 to 1)."),
    ("switchyard:prefix_cache_queries_total", Counter, "Prompt tokens looked up in the prefix cache."),
    ("switchyard:prefix_cache_hits_total", Counter, "Prompt tokens found in the prefix cache."),
    ("switchyard:num_preemptions_total", Counter, "Sequences preempted to free KV cache blocks."),
    ("switchyard:prompt_tokens_total", Counter, "Prompt tokens prefilled."),
    ("switchyard:generation_tokens_total", Counter, "Tokens generated."),
    ("switchyard:time_to_first_token_seconds", Histogram, "Time from arrival to the first generated token, per request."),
    ("switchyard:inter_token_latency_seconds", Histogram, "Time between consecutive generated tokens."),
    ("switchyard:e2e_request_latency_seconds", Histogram, "Time from arrival to the end of a request, whatever its outcome."),
    ("switchyard:request_queue_time_seconds", Histogram, "Time a request waited before it was first scheduled."),
    ("switchyard:request_success_total", Counter, "Requests ended, by finished_reason: stop, length, abort (the client or server left) or error."),
    ("switchyard:spec_decode_num_drafts_total", Counter, "Speculative proposals verified."),
    ("switchyard:spec_decode_num_draft_tokens_total", Counter, "Tokens proposed by speculation."),
    ("switchyard:spec_decode_num_accepted_tokens_total", Counter, "Proposed tokens the model accepted."),
    ("switchyard:spec_decode_num_accepted_tokens_per_pos_total", Counter, "Accepted proposed tokens, by position in the proposal."),
    // Routing, rollouts and shadows.
    ("switchyard:route_requests_total", Counter, "Requests routed, by route, version and arm."),
    ("switchyard:shadow_requests_total", Counter, "Copies of requests sent to shadows."),
    ("switchyard:shadow_errors_total", Counter, "Shadow copies that failed."),
    ("switchyard:shadow_skipped_total", Counter, "Shadow copies dropped (the shadow was busy or its primary failed)."),
    ("switchyard:shadow_compared_total", Counter, "Shadow answers compared with their primary."),
    ("switchyard:shadow_exact_matches_total", Counter, "Shadow answers equal to their primary."),
    ("switchyard:shadow_similarity", Histogram, "Text similarity of a shadow's answer to its primary's (0 to 1)."),
    ("switchyard:shadow_kl", Histogram, "Teacher-forced KL divergence of a shadow from its primary, per token."),
    ("switchyard:shadow_mean_logprob", Histogram, "Mean log-probability the shadow gives the primary's tokens."),
    ("switchyard:shadow_argmax_agreement", Histogram, "Share of tensor rows whose argmax agrees with the primary's."),
    ("switchyard:shadow_mean_abs_diff", Histogram, "Mean absolute difference of a shadow's output tensors from the primary's."),
    ("switchyard:shadow_latency_delta_seconds", Histogram, "Shadow latency minus primary latency."),
    ("switchyard:request_log_dropped_total", Counter, "Sampled requests the request log could not keep."),
    // Prompt experiments (labelled experiment, arm).
    ("switchyard:experiment_requests_total", Counter, "Requests an experiment arm served."),
    ("switchyard:experiment_errors_total", Counter, "Requests an experiment arm failed."),
    ("switchyard:experiment_output_tokens_total", Counter, "Tokens an experiment arm generated."),
    ("switchyard:experiment_random_assignments_total", Counter, "Requests assigned to an arm at random (no sticky unit)."),
    ("switchyard:experiment_feedback_total", Counter, "Feedback received for an experiment arm's requests."),
    ("switchyard:experiment_reloads_total", Counter, "Reloads of the experiments file, by outcome."),
    ("switchyard:experiment_latency_seconds", Histogram, "End-to-end latency per experiment arm."),
    ("switchyard:experiment_ttft_seconds", Histogram, "Time to first token per experiment arm."),
    // The HTTP port.
    ("switchyard:http_connections", Gauge, "Open HTTP connections, by the front (event-loop thread) that serves them."),
    // Remote upstreams.
    ("switchyard:upstream_requests_total", Counter, "Requests sent to remote upstreams, by replica and status."),
    ("switchyard:upstream_errors_total", Counter, "Requests no upstream replica answered."),
    ("switchyard:upstream_healthy", Gauge, "Whether an upstream replica passes its health checks (1) or not (0)."),
    ("switchyard:registry_notifications_total", Counter, "Registry changes other nodes announced (PostgreSQL NOTIFY), each waking the controller."),
    ("switchyard:rollout_lease_held", Gauge, "Whether this node holds the rollout lease and runs the rollout policies (1) or not (0)."),
    ("switchyard:registry_load_failures_total", Counter, "Registry versions that failed to load (fetch, checksum, contract or load), by model."),
    ("switchyard:registry_audit_verified", Gauge, "Whether the audit log's hash chain verified (1) or not (0) at its last check."),
    ("switchyard:registry_audit_entries", Gauge, "Audit log entries at the last verification."),
    ("switchyard:tls_reloads_total", Counter, "Times changed TLS files were loaded (outcome ok) or kept out for not loading (outcome error)."),
    // The Triton plane, with Triton's names.
    ("nv_inference_request_success", Counter, "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", Counter, "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", Counter, "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", Counter, "Number of model executions performed (does not include cached requests)"),
    ("nv_inference_request_duration_us", Counter, "Cumulative inference request duration in microseconds (includes cached requests)"),
    ("nv_inference_queue_duration_us", Counter, "Cumulative inference queuing duration in microseconds (includes cached requests)"),
    ("nv_inference_compute_input_duration_us", Counter, "Cumulative compute input duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_infer_duration_us", Counter, "Cumulative compute inference duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_output_duration_us", Counter, "Cumulative inference compute output duration in microseconds (does not include cached requests)"),
    ("nv_inference_pending_request_count", Gauge, "Instantaneous number of pending requests awaiting execution per-model."),
    ("nv_inference_request_duration_seconds", Histogram, "Inference request duration in seconds"),
    ("nv_inference_queue_duration_seconds", Histogram, "Inference queuing duration in seconds"),
    ("nv_inference_batch_size", Histogram, "Sizes of the batches the dynamic batcher formed"),
    ("nv_cache_num_hits_per_model", Counter, "Number of cache hits per model"),
    ("nv_cache_num_misses_per_model", Counter, "Number of cache misses per model"),
    ("nv_cache_hit_duration_per_model", Counter, "Total cache hit duration per model, in microseconds"),
    ("nv_cache_miss_duration_per_model", Counter, "Total cache miss (insert and lookup) duration per model, in microseconds"),
    ("nv_cache_num_entries", Gauge, "Number of responses stored in response cache"),
    ("nv_cache_util", Gauge, "Cache utilization [0.0 - 1.0]"),
];

/// Describes every family to the installed recorder, and exports the
/// unlabelled ones at zero from the start.
pub fn describe() {
    for &(name, kind, help) in FAMILIES {
        match kind {
            Counter => metrics::describe_counter!(name, help),
            Gauge => metrics::describe_gauge!(name, help),
            Histogram => metrics::describe_histogram!(name, help),
        }
    }
    metrics::gauge!("nv_cache_num_entries").set(0.0);
    metrics::gauge!("nv_cache_util").set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the sources name is described here, as what it is.
    #[test]
    fn every_family_in_the_sources_is_described() {
        let mut named = Vec::new();
        for dir in ["src", "../engine/src"] {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let mut stack = vec![root];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs")
                        && !p.ends_with("telemetry.rs")
                    {
                        let text = std::fs::read_to_string(&p).unwrap();
                        for (macro_name, kind) in [
                            ("counter!(", Counter),
                            ("gauge!(", Gauge),
                            ("histogram!(", Histogram),
                        ] {
                            for (at, _) in text.match_indices(macro_name) {
                                let rest = text[at + macro_name.len()..].trim_start();
                                if let Some(name) =
                                    rest.strip_prefix('"').and_then(|r| r.split('"').next())
                                {
                                    named.push((name.to_string(), kind, p.display().to_string()));
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(named.len() > 40, "{named:?}");
        for (name, kind, file) in named {
            let described = FAMILIES.iter().find(|(n, _, _)| *n == name);
            assert_eq!(
                described.map(|d| d.1),
                Some(kind),
                "{name} ({file}) is not described as a {kind:?}"
            );
            if kind == Counter && name.starts_with("switchyard:") {
                assert!(name.ends_with("_total"), "{name}: counters end in _total");
            }
        }
    }
}
