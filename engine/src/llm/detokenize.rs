//! Turns generated token ids into text deltas: incremental decoding that waits
//! for whole UTF-8 characters, and stop strings matched across token boundaries.
use super::tokenizer::Tokenizer;

/// Emits the text that each new token adds, holding back incomplete characters.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// `ids` are all output tokens so far, the newest last.
    pub fn next(&mut self, tok: &Tokenizer, ids: &[u32]) -> String {
        let prefix = tok
            .decode(&ids[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let full = tok.decode(&ids[self.prefix_offset..]).unwrap_or_default();
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }
}

/// Finds stop strings in streamed text; never releases text that could still
/// turn out to be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What the matcher lets through for one delta.
#[derive(Debug, PartialEq)]
pub struct Released {
    pub text: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds a delta. With `check` false (before `min_tokens`), stop strings are ignored.
    pub fn push(&mut self, delta: &str, check: bool) -> Released {
        self.pending.push_str(delta);
        if !check {
            return Released {
                text: std::mem::take(&mut self.pending),
                stopped: false,
            };
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let hold = self.longest_partial_suffix();
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// Releases what was held back, at the end of a sequence not ended by a stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let suffix = &self.pending[i..];
                if suffix.len() < s.len() && s.starts_with(suffix) {
                    best = best.max(suffix.len());
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            let r = m.push(d, true);
            out += &r.text;
            if r.stopped {
                return (out, true);
            }
        }
        out += &m.flush();
        (out, false)
    }

    #[test]
    fn stop_split_across_tokens_is_never_emitted() {
        assert_eq!(
            run(&["END"], &["Hello E", "N", "D more"]),
            ("Hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["Hi EN", "X"]), ("Hi ENX".into(), false));
        assert_eq!(run(&["stop"], &["no st"]), ("no st".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn held_text_is_released_as_soon_as_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("ab E", true).text, "ab ");
        assert_eq!(m.push("x", true).text, "Ex");
        assert_eq!(m.push("héllo", false).text, "héllo");
    }
}
