//! Structured outputs: a request's [`Constraint`] (a JSON schema, any JSON
//! object, a regular expression, a choice of strings, a Lark grammar) is
//! compiled by llguidance into a matcher over the model's vocabulary. At each
//! step the matcher gives the set of tokens that keep the output inside the
//! grammar; sampling sees only those, and the chosen token advances it.
use super::error::{LlmError, Result};
use super::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid under this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object (OpenAI's `json_object` mode).
    JsonObject,
    /// A string the regular expression matches whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A sentence of this Lark grammar (llguidance's dialect).
    Lark(String),
}

/// JSON layout for schema constraints, unless the schema sets its own
/// (`x-guidance`): one line with OpenAI's separators. Free whitespace lets a
/// small model pad the object with newlines until `max_tokens` runs out.
fn compact_layout() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

impl Constraint {
    fn grammar(&self) -> Result<TopLevelGrammar> {
        let schema = |mut s: serde_json::Value| {
            if let Some(o) = s.as_object_mut() {
                o.entry("x-guidance").or_insert_with(compact_layout);
            }
            TopLevelGrammar::from_json_schema(s)
        };
        Ok(match self {
            Self::JsonSchema(s) => {
                if !(s.is_object() || s.is_boolean()) {
                    return Err(LlmError::Constraint(
                        "a JSON schema must be an object (or true/false)".into(),
                    ));
                }
                schema(s.clone())
            }
            Self::JsonObject => schema(serde_json::json!({"type": "object"})),
            Self::Regex(r) => TopLevelGrammar::from_regex(r),
            Self::Choice(choices) => {
                if choices.is_empty() || choices.iter().any(String::is_empty) {
                    return Err(LlmError::Constraint(
                        "a choice needs at least one non-empty string".into(),
                    ));
                }
                // Lark string literals take JSON's escapes.
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| serde_json::Value::from(c.as_str()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Self::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// The model's vocabulary as llguidance reads it: each token's bytes in a
/// trie, and the tokenizer for text the trie does not cover.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode_plain(text).unwrap_or_default()
        })
    }
}

/// Compiles constraints for one model; built once, on the first request
/// that carries a constraint (the vocabulary's trie and token classes take
/// a moment for a large vocabulary).
pub struct Guidance {
    factory: ParserFactory,
}

impl Guidance {
    /// `vocab_size` is the model's (its output rows), which may exceed the
    /// tokenizer's: the rows past it are tokens no text spells.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self> {
        let unavailable = |e: String| {
            LlmError::Constraint(format!(
                "structured outputs are not available for this model's tokenizer: {e}"
            ))
        };
        let json: serde_json::Value =
            serde_json::from_str(&tokenizer.to_json()?).map_err(|e| unavailable(e.to_string()))?;
        let mut words =
            std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
                .map_err(|_| unavailable("its vocabulary could not be read as bytes".into()))?
                .map_err(|e| unavailable(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(unavailable(format!(
                "the tokenizer has {} tokens, more than the model's {vocab_size} output rows",
                words.len()
            )));
        }
        while words.len() < vocab_size {
            let mut unused = format!(".<[{}]>", words.len()).into_bytes();
            unused[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(unused);
        }
        let eos = tokenizer.eos_ids();
        let Some(&first) = eos.first() else {
            return Err(unavailable("it names no end-of-sequence token".into()));
        };
        let info = TokRxInfo::new(vocab_size as u32, first);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| unavailable(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `c`; a schema, expression or grammar that does not compile
    /// is refused with llguidance's account of what is wrong.
    pub fn compile(&self, c: &Constraint) -> Result<Guide> {
        let parser = self
            .factory
            .create_parser(c.grammar()?)
            .map_err(|e| LlmError::Constraint(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(LlmError::Constraint(e));
        }
        Ok(Guide {
            matcher,
            mask: None,
        })
    }
}

/// One sequence's place in its grammar, and the allowed tokens for its next
/// step once computed.
#[derive(Clone)]
pub struct Guide {
    matcher: Matcher,
    mask: Option<std::result::Result<SimpleVob, String>>,
}

impl Guide {
    /// Computes the next step's allowed tokens (the engine runs this beside
    /// the forward pass).
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            self.mask = Some(self.matcher.compute_mask().map_err(|e| e.to_string()));
        }
    }

    /// The allowed tokens for this step, computed now if [`Guide::prepare`]
    /// has not run; taken, so that the next step computes its own.
    pub fn take_mask(&mut self) -> std::result::Result<SimpleVob, String> {
        self.prepare();
        self.mask.take().expect("prepared")
    }

    /// Advances past `token`; true once the grammar is complete and admits
    /// nothing more.
    pub fn advance(&mut self, token: u32) -> std::result::Result<bool, String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| e.to_string())?;
        Ok(self.matcher.is_stopped())
    }
}

/// Bans, in `logits`, every token `mask` does not allow.
pub fn apply_mask(logits: &mut [f32], mask: &SimpleVob) {
    for (i, l) in logits.iter_mut().enumerate() {
        if i >= mask.len() || !mask.is_allowed(i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
}
