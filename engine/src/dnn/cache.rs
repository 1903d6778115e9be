//! Triton's local response cache: a model's outputs kept under a hash of
//! the model, version and every input (name, datatype, shape, bytes), least
//! recently used first out once the entries outgrow the size in bytes.
use super::tensor::Tensor;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

pub type Key = [u8; 32];

/// The request's key: its model, version and inputs (in config order).
pub fn key(model: &str, version: i64, inputs: &[Tensor]) -> Key {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(model.as_bytes());
    field(&version.to_le_bytes());
    for t in inputs {
        field(t.name.as_bytes());
        field(t.dtype.wire().as_bytes());
        let shape: Vec<u8> = t.shape.iter().flat_map(|d| d.to_le_bytes()).collect();
        field(&shape);
        field(&t.data);
    }
    h.finalize().into()
}

struct Entry {
    outputs: Vec<Tensor>,
    bytes: usize,
    used: u64,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<Key, Entry>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, Key>,
    bytes: usize,
    clock: u64,
}

pub struct ResponseCache {
    capacity: usize,
    lru: Mutex<Lru>,
}

fn size_of(outputs: &[Tensor]) -> usize {
    outputs
        .iter()
        .map(|t| t.data.len() + t.name.len() + 8 * t.shape.len() + 64)
        .sum::<usize>()
        + 32
}

impl ResponseCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            lru: Mutex::new(Lru::default()),
        }
    }

    pub fn get(&self, key: &Key) -> Option<Vec<Tensor>> {
        let mut lru = self.lru.lock().expect("cache lock");
        lru.clock += 1;
        let now = lru.clock;
        let e = lru.entries.get_mut(key)?;
        let before = std::mem::replace(&mut e.used, now);
        let outputs = e.outputs.clone();
        lru.order.remove(&before);
        lru.order.insert(now, *key);
        Some(outputs)
    }

    /// Keeps `outputs` unless they alone outgrow the cache; evicts the least
    /// recently used entries to make room.
    pub fn insert(&self, key: Key, outputs: Vec<Tensor>) {
        let bytes = size_of(&outputs);
        if bytes > self.capacity {
            return;
        }
        let mut lru = self.lru.lock().expect("cache lock");
        lru.clock += 1;
        let now = lru.clock;
        if let Some(old) = lru.entries.remove(&key) {
            lru.order.remove(&old.used);
            lru.bytes -= old.bytes;
        }
        while lru.bytes + bytes > self.capacity {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some(e) = lru.entries.remove(&oldest) {
                lru.bytes -= e.bytes;
            }
        }
        lru.bytes += bytes;
        lru.order.insert(now, key);
        lru.entries.insert(
            key,
            Entry {
                outputs,
                bytes,
                used: now,
            },
        );
        metrics::gauge!("nv_cache_num_entries").set(lru.entries.len() as f64);
        metrics::gauge!("nv_cache_util").set(lru.bytes as f64 / self.capacity as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dnn::tensor::DataType;

    fn t(v: f32) -> Tensor {
        Tensor::from_f32("y", vec![1, 1], &[v])
    }

    #[test]
    fn least_recently_used_goes_first() {
        let one = size_of(&[t(0.0)]);
        let cache = ResponseCache::new(2 * one);
        let k = |i: u8| {
            key(
                "m",
                1,
                &[Tensor::new("x", DataType::Uint8, vec![1], vec![i])],
            )
        };
        cache.insert(k(1), vec![t(1.0)]);
        cache.insert(k(2), vec![t(2.0)]);
        assert!(cache.get(&k(1)).is_some());
        cache.insert(k(3), vec![t(3.0)]);
        assert!(cache.get(&k(2)).is_none(), "2 was least recently used");
        assert_eq!(cache.get(&k(1)).unwrap()[0].to_f32().unwrap(), vec![1.0]);
        assert!(cache.get(&k(3)).is_some());
        // Keys tell models, versions, shapes and bytes apart.
        let x = Tensor::new("x", DataType::Uint8, vec![2], vec![1, 2]);
        let y = Tensor::new("x", DataType::Uint8, vec![1, 2], vec![1, 2]);
        let x = std::slice::from_ref(&x);
        assert_ne!(key("m", 1, x), key("m", 1, &[y]));
        assert_ne!(key("m", 1, x), key("m", 2, x));
        assert_ne!(key("m", 1, x), key("n", 1, x));
    }
}
