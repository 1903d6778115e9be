//! The engine's configuration and the shapes of what goes in and comes out:
//! requests, their events, and the engine's counters.
use super::guided::Constraint;
use super::kv_cache::KvDtype;
use super::sampling::SamplingParams;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Requests that may wait for admission; more are refused with [`LlmError::QueueFull`].
    pub max_waiting: usize,
    /// Longest prompt + output served; capped by the model's own context and
    /// by the KV pool.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    pub kv_cache: KvCacheSize,
    /// How keys and values are stored (f16 halves the pool's memory and the
    /// traffic of attention; f32 keeps them exact).
    pub kv_cache_dtype: KvDtype,
    /// Reuse the KV blocks of a prompt prefix seen before.
    pub enable_prefix_caching: bool,
    /// Serve `/v1/embeddings` from this model (mean-pooled final hidden
    /// states); off unless configured.
    pub embeddings: bool,
    /// Speculative decoding; off unless configured.
    pub speculative: Option<SpeculativeConfig>,
}

/// Speculative decoding: proposed tokens (by n-gram prompt lookup, or by a
/// draft model given at start) are verified in the next forward pass,
/// beside everyone else's tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeculativeConfig {
    /// Tokens proposed per step (at least 1).
    pub num_speculative_tokens: usize,
    /// The shortest and longest suffix looked up (`1 ≤ min ≤ max`).
    pub prompt_lookup_min: usize,
    pub prompt_lookup_max: usize,
    /// No proposals while more sequences than this run (the batch is
    /// compute-bound there, and verification would cost more than it saves).
    pub disable_by_batch_size: Option<usize>,
}

/// The KV pool's default share of the memory available at start.
pub const DEFAULT_KV_CACHE_FRACTION: f64 = 0.25;

/// How much memory the KV pool takes, fixed when the engine starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheSize {
    Bytes(u64),
    /// A share of the memory available when the engine starts.
    FractionOfFree(f64),
}

impl KvCacheSize {
    pub(crate) fn bytes(self) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::FractionOfFree(f) => (available_memory() as f64 * f) as u64,
        }
    }
}

/// `MemAvailable` from `/proc/meminfo` (4 GiB where there is none), or
/// less when the process's cgroup allows less: a container's limit counts,
/// not the host's memory.
fn available_memory() -> u64 {
    let host = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kb| kb * 1024);
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    match cgroup_headroom(std::path::Path::new("/sys/fs/cgroup"), &own) {
        Some(room) => host.min(room),
        None => host,
    }
}

/// What the memory cgroup of a process still allows (its limit less its
/// usage), from `/proc/self/cgroup` (`own`) and the cgroup file system at
/// `root`: cgroup v2 (`memory.max`, `memory.current`) or v1
/// (`memory/…/memory.limit_in_bytes`, `memory.usage_in_bytes`). `None`
/// when there is no limit or no memory controller.
pub fn cgroup_headroom(root: &std::path::Path, own: &str) -> Option<u64> {
    let read = |dir: &std::path::Path, file: &str| -> Option<String> {
        std::fs::read_to_string(dir.join(file))
            .ok()
            .map(|s| s.trim().to_string())
    };
    // The process's own group, else the root of the hierarchy (a container
    // sees its own group as "/").
    let dirs = |base: std::path::PathBuf, path: &str| {
        let own = base.join(path.trim_start_matches('/'));
        [own, base]
    };
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if id == "0" && controllers.is_empty() {
            for dir in dirs(root.to_path_buf(), path) {
                if let (Some(max), Some(current)) =
                    (read(&dir, "memory.max"), read(&dir, "memory.current"))
                {
                    let limit: u64 = max.parse().ok()?; // "max": no limit
                    return Some(limit.saturating_sub(current.parse().ok()?));
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            for dir in dirs(root.join("memory"), path) {
                if let (Some(limit), Some(usage)) = (
                    read(&dir, "memory.limit_in_bytes"),
                    read(&dir, "memory.usage_in_bytes"),
                ) {
                    let limit: u64 = limit.parse().ok()?;
                    // v1 writes a page-rounded i64::MAX for "no limit".
                    if limit >= 1 << 60 {
                        return None;
                    }
                    return Some(limit.saturating_sub(usage.parse().ok()?));
                }
            }
        }
    }
    None
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 16,
            max_num_batched_tokens: 256,
            max_waiting: 64,
            max_model_len: 8192,
            block_size: 16,
            kv_cache: KvCacheSize::FractionOfFree(DEFAULT_KV_CACHE_FRACTION),
            kv_cache_dtype: KvDtype::default(),
            enable_prefix_caching: true,
            embeddings: false,
            speculative: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// EOS and stop strings are ignored until this many tokens exist.
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Parallel samples of the prompt; they share its KV blocks.
    pub n: usize,
    /// Structured output: every sample stays inside this grammar.
    pub constraint: Option<Constraint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's id in the model's vocabulary.
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Text released by one generated token of sample `index` (may be empty
    /// while held back).
    Delta {
        index: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Sample `index` is complete; the request is once all `n` are.
    Finished {
        index: usize,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens found in the prefix cache when it was first
        /// scheduled (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
        cached_tokens: usize,
    },
    Failed(String),
}

/// A snapshot of an engine's KV pool and scheduler counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub total_blocks: usize,
    pub free_blocks: usize,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_queried: u64,
    pub prefix_hit: u64,
    /// Proposals made by speculation, the tokens they held, and those accepted.
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// Proposals whose token at each position was accepted.
    pub accepted_at: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::cgroup_headroom;
    use std::fs;

    #[test]
    fn cgroup_limits_are_read_for_v2_and_v1() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("system.slice/app.service");
        fs::create_dir_all(&v2).unwrap();
        fs::write(v2.join("memory.max"), "1073741824\n").unwrap();
        fs::write(v2.join("memory.current"), "268435456\n").unwrap();
        let own = "0::/system.slice/app.service\n";
        assert_eq!(cgroup_headroom(root.path(), own), Some(805306368));
        fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_headroom(root.path(), own), None);
        // A container sees its group as "/": the root's files count.
        let v1 = root.path().join("memory");
        fs::create_dir_all(&v1).unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "536870912").unwrap();
        fs::write(v1.join("memory.usage_in_bytes"), "36870912").unwrap();
        let own = "12:cpu,cpuacct:/\n4:memory:/docker/abc\n";
        assert_eq!(cgroup_headroom(root.path(), own), Some(500000000));
        fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712").unwrap();
        assert_eq!(cgroup_headroom(root.path(), own), None);
        assert_eq!(cgroup_headroom(root.path(), "1:name=systemd:/\n"), None);
    }
}
