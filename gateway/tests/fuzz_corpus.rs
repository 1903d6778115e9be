//! The fuzz targets (`gateway::fuzz`) in every test run: each replays its
//! checked-in corpus (`fuzz/corpus/<target>/`, grown by `cargo fuzz` runs and
//! the crashes they found), then runs seeded mutations of it for a bounded
//! time (`SWITCHYARD_FUZZ_SECS` per target, 5 by default). A panic saves the
//! input under `target/fuzz-failures/` and fails the test, naming the file.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break parsers more often than random bytes do.
const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"18446744073709551615",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"1e308",
    b"NaN",
    b"-Infinity",
    b"\"\"",
    b"[]",
    b"{}",
    b"null",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x80",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"..",
    b"/etc/passwd",
    b"{{",
    b"{%",
];

fn mutate(input: &[u8], corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(at..at, v.iter().copied());
            }
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 if !out.is_empty() => {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(32)).min(out.len());
                let piece = out[start..end].to_vec();
                out.splice(at..at, piece);
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[cut..]);
            }
            _ => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
        }
    }
    out.truncate(1 << 16);
    out
}

fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_ok() {
        return;
    }
    let dir = root().join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let digest: u64 = input.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let file = dir.join(format!("{name}-{digest:016x}"));
    std::fs::write(&file, input).unwrap();
    panic!(
        "fuzz target `{name}` panicked; the input is in {} (add it to fuzz/corpus/{name}/ \
         once fixed)",
        file.display()
    );
}

fn fuzz(name: &str) {
    let (_, target) = gateway::fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz target `{name}`"));
    let dir = root().join("fuzz/corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let corpus: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!corpus.is_empty(), "{} holds no corpus", dir.display());
    for input in &corpus {
        run(name, *target, input);
    }
    let secs: f64 = std::env::var("SWITCHYARD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let seed = name
        .bytes()
        .fold(0x5eed_u64, |h, b| h.rotate_left(7) ^ b as u64)
        | 1;
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let base = &corpus[rng.below(corpus.len())];
        let input = mutate(base, &corpus, &mut rng);
        run(name, *target, &input);
        runs += 1;
    }
    eprintln!(
        "{name}: {} corpus inputs, {runs} mutations (seed {seed:#x})",
        corpus.len()
    );
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                fuzz(stringify!($name));
            }
        )*

        #[test]
        fn every_target_is_replayed_here() {
            let here = [$(stringify!($name)),*];
            for (name, _) in gateway::fuzz::TARGETS {
                assert!(here.contains(name), "fuzz target `{name}` has no test in this file");
            }
        }
    };
}

targets!(
    kserve_http_infer,
    kserve_grpc_infer,
    model_config,
    config_yaml,
    gguf_header,
    safetensors_header,
    chat_template,
    tokenizer,
    openai_request,
    sampling_parameters,
);
