//! The tokenizer we rebuild from GGUF metadata against an independent one:
//! llama.cpp's tokenizer test vectors, the ids Hugging Face's own tokenizer
//! gave for about 45 hard strings per vocabulary (Unicode, emoji, digit runs,
//! whitespace runs, contractions, code), recorded by llama.cpp's
//! `test-tokenizer-0.py` beside each `ggml-vocab-*.gguf`. One vocabulary per
//! pre-tokenizer we rebuild: GPT-2's byte-level default, StarCoder's and
//! Refact's digit splitting (SmolLM's too), Llama 3's and Qwen2's split
//! patterns, and Llama 2's SentencePiece vocabulary (byte fallback, a space
//! put in front). `scripts/test.sh` fetches them from the llama-cpp-python sdist
//! (sha256-pinned) into `SWITCHYARD_LLAMA_VOCABS`.
use candle_core::quantized::gguf_file;
use engine::llm::Tokenizer;
use std::path::PathBuf;

const VOCABS: [&str; 6] = [
    "gpt-2",
    "starcoder",
    "refact",
    "llama-bpe",
    "qwen2",
    "llama-spm",
];

fn vocab_dir() -> Option<PathBuf> {
    match std::env::var_os("SWITCHYARD_LLAMA_VOCABS") {
        Some(d) => Some(d.into()),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs every test: set SWITCHYARD_LLAMA_VOCABS (scripts/test.sh does)"
            );
            eprintln!("SWITCHYARD_LLAMA_VOCABS is not set: not run");
            None
        }
    }
}

#[test]
fn gguf_vocabularies_tokenize_as_hugging_face_does() {
    let Some(dir) = vocab_dir() else { return };
    let mut checked = 0;
    for name in VOCABS {
        let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
        let mut f =
            std::fs::File::open(&gguf).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
        let content = gguf_file::Content::read(&mut f).unwrap();
        let tok = Tokenizer::from_gguf(&content.metadata).unwrap();
        let bos = tok
            .bos_token()
            .and_then(|b| tok.encode(&b).ok())
            .and_then(|ids| ids.last().copied());
        let read = |ext: &str| {
            std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.{ext}"))).unwrap()
        };
        let inputs: Vec<String> = read("inp")
            .split("\n__ggml_vocab_test__\n")
            .map(str::to_string)
            .collect();
        let outputs: Vec<Vec<u32>> = read("out")
            .split('\n')
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        assert_eq!(
            inputs.len(),
            outputs.len(),
            "{name}: inputs and outputs pair up"
        );
        for (text, want) in inputs.iter().zip(&outputs) {
            let mut got = tok.encode(text).unwrap();
            // Hugging Face's ids are without special tokens; drop the BOS
            // a vocabulary's `add_bos_token` makes us put first.
            if got.first().is_some_and(|&t| Some(t) == bos) && want.first().copied() != bos {
                got.remove(0);
            }
            assert_eq!(&got, want, "{name}: {text:?}");
            checked += 1;
        }
    }
    eprintln!("{checked} strings over {} vocabularies agree", VOCABS.len());
}
