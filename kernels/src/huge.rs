//! Buffers that every token streams (the packed weights) on 2 MiB pages
//! where Linux offers transparent huge pages on request (`madvise` mode, a
//! common default). With 4 KiB pages a decode step of even a small
//! model touches tens of thousands of pages, each a TLB miss and a page
//! walk. A model's weights are many matrices of a few hundred kilobytes, too
//! small for a huge page each, so [`HugeBuf`]s are carved one after another
//! from shared 2 MiB-aligned chunks instead of the allocator's heap.
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

const HUGE: usize = 2 << 20;
/// Bytes of one shared chunk; a buffer of half of that or more is given a
/// mapping of its own.
const CHUNK: usize = 16 * HUGE;
/// Buffers start on cache lines.
const ALIGN: usize = 64;

/// Asks for huge pages under the whole 2 MiB pages of `len` bytes from
/// `start`; a no-op where the system offers none (or is not Linux).
fn advise(start: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let (from, to) = (
            (start as usize).next_multiple_of(HUGE),
            (start as usize + len) / HUGE * HUGE,
        );
        if from < to {
            // SAFETY: the range lies inside one allocation, and the advice
            // changes how its pages are backed, never their contents.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

/// Element types whose all-zero bytes are the value zero.
pub trait Zeroable: Copy + Send + Sync + 'static {}
impl Zeroable for u8 {}
impl Zeroable for f32 {}

/// Zeroed memory from the OS, 2 MiB-aligned, freed when the last buffer
/// carved from it is dropped.
struct Chunk {
    base: NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: a chunk is plain memory; its buffers own disjoint parts of it.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(bytes: usize) -> Chunk {
        let layout = std::alloc::Layout::from_size_align(bytes.next_multiple_of(HUGE), HUGE)
            .expect("a buffer's size fits the address space");
        #[cfg(unix)]
        let base = {
            // Anonymous pages are zero and untouched, so the advice applies
            // to their first touch; the mapping is trimmed to the alignment.
            let len = layout.size() + HUGE;
            // SAFETY: a fresh private anonymous mapping.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(layout)
            }
            let at = (raw as usize).next_multiple_of(HUGE);
            let (head, tail) = (at - raw as usize, len - (at - raw as usize) - layout.size());
            // SAFETY: both ends lie in the mapping just made and are unused.
            unsafe {
                if head > 0 {
                    libc::munmap(raw, head);
                }
                if tail > 0 {
                    libc::munmap((at + layout.size()) as *mut libc::c_void, tail);
                }
            }
            at as *mut u8
        };
        #[cfg(not(unix))]
        // SAFETY: the layout's size is not zero.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        let base = NonNull::new(base).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        advise(base.as_ptr(), layout.size());
        Chunk { base, layout }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the memory was mapped (or allocated) by `Chunk::new` with
        // this layout, and no buffer refers to it any more.
        #[cfg(unix)]
        unsafe {
            libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.layout.size());
        }
        #[cfg(not(unix))]
        unsafe {
            std::alloc::dealloc(self.base.as_ptr(), self.layout)
        };
    }
}

/// Where small buffers are carved from: the current chunk, the bytes of it
/// in use, and how far it has ever been used (beyond that it is still the
/// OS's zeros). The newest buffer's room is given back when it is dropped,
/// so a buffer made only to be copied and dropped leaves nothing behind.
struct Arena(Mutex<Option<Carving>>);

struct Carving {
    chunk: Arc<Chunk>,
    used: usize,
    touched: usize,
}

static ARENA: Arena = Arena(Mutex::new(None));

impl Arena {
    /// `bytes` of zeros at offset `at` of a chunk.
    fn carve(&self, bytes: usize) -> (Arc<Chunk>, usize) {
        if bytes >= CHUNK / 2 {
            return (Arc::new(Chunk::new(bytes)), 0);
        }
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |c: &Carving| c.used.next_multiple_of(ALIGN) + bytes <= CHUNK;
        if !current.as_ref().is_some_and(fits) {
            *current = Some(Carving {
                chunk: Arc::new(Chunk::new(CHUNK)),
                used: 0,
                touched: 0,
            });
        }
        let c = current.as_mut().expect("a chunk is current");
        let at = c.used.next_multiple_of(ALIGN);
        if at < c.touched {
            // Room given back by a dropped buffer: zeroed again.
            let dirty = (c.touched - at).min(bytes);
            // SAFETY: inside the chunk, and no live buffer lies past `used`.
            unsafe { c.chunk.base.as_ptr().add(at).write_bytes(0, dirty) };
        }
        c.used = at + bytes;
        c.touched = c.touched.max(c.used);
        (c.chunk.clone(), at)
    }

    /// A buffer of `bytes` at `at` of `chunk` is dropped: if it is the
    /// newest in the current chunk, its room is free again.
    fn give_back(&self, chunk: &Arc<Chunk>, at: usize, bytes: usize) {
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = current.as_mut() {
            // Buffers start on cache lines, so the newest one ends where
            // `used` does, up to that alignment.
            let end = (at + bytes).next_multiple_of(ALIGN);
            if Arc::ptr_eq(&c.chunk, chunk) && c.used.next_multiple_of(ALIGN) == end {
                c.used = at;
            }
        }
    }
}

/// A fixed-length zeroed buffer on huge pages: small ones share chunks with
/// the buffers made just before and after them.
pub struct HugeBuf<T: 'static> {
    arena: &'static Arena,
    /// Keeps the memory mapped; `None` for an empty buffer.
    chunk: Option<Arc<Chunk>>,
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: the buffer owns its elements as a `Vec` does.
unsafe impl<T: Send> Send for HugeBuf<T> {}
unsafe impl<T: Sync> Sync for HugeBuf<T> {}

impl<T: Zeroable> HugeBuf<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        Self::zeroed_in(&ARENA, len)
    }

    fn zeroed_in(arena: &'static Arena, len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        if bytes == 0 {
            return Self {
                arena,
                chunk: None,
                ptr: NonNull::dangling(),
                len,
            };
        }
        let (chunk, at) = arena.carve(bytes);
        // SAFETY: `at + bytes` lies inside the chunk, and `at` is aligned
        // for any element type here.
        let ptr = unsafe { NonNull::new_unchecked(chunk.base.as_ptr().add(at) as *mut T) };
        Self {
            arena,
            chunk: Some(chunk),
            ptr,
            len,
        }
    }

    /// A copy of `v`.
    pub fn from_slice(v: &[T]) -> Self {
        let mut b = Self::zeroed(v.len());
        b.copy_from_slice(v);
        b
    }
}

impl<T> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        if let Some(chunk) = &self.chunk {
            let at = self.ptr.as_ptr() as usize - chunk.base.as_ptr() as usize;
            self.arena
                .give_back(chunk, at, self.len * std::mem::size_of::<T>());
        }
    }
}

impl<T> Deref for HugeBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialized elements from `ptr`, owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and no other buffer overlaps these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers start zeroed and aligned, small ones carved side by side do
    /// not overlap, a large one has its own mapping, and memory outlives
    /// the chunk's other buffers.
    #[test]
    fn buffers_are_zeroed_disjoint_and_outlive_their_neighbours() {
        let mut small: Vec<HugeBuf<u8>> = (1..40).map(|i| HugeBuf::zeroed(i * 1000 + 1)).collect();
        let mut large = HugeBuf::<f32>::zeroed(CHUNK / 4 + 3);
        assert!(large.iter().all(|&v| v == 0.0));
        large.fill(1.5);
        for (i, b) in small.iter_mut().enumerate() {
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&v| v == 0));
            b.fill(i as u8);
        }
        let kept = small.remove(7);
        drop(small);
        assert!(kept.iter().all(|&v| v == 7));
        assert!(large.iter().all(|&v| v == 1.5));
        let empty = HugeBuf::<f32>::zeroed(0);
        assert!(empty.is_empty());
        let copy = HugeBuf::from_slice(&[1u8, 2, 3]);
        assert_eq!(&copy[..], &[1, 2, 3]);
    }

    /// The newest buffer's room goes back to the arena when it is dropped,
    /// and comes out zeroed again; an older buffer's stays taken.
    #[test]
    fn the_newest_buffers_room_is_given_back_zeroed() {
        let arena: &'static Arena = Box::leak(Box::new(Arena(Mutex::new(None))));
        let mut older = HugeBuf::<u8>::zeroed_in(arena, 1000);
        older.fill(7);
        let mut newest = HugeBuf::<u8>::zeroed_in(arena, 1000);
        newest.fill(9);
        let room = newest.as_ptr();
        drop(newest);
        let again = HugeBuf::<u8>::zeroed_in(arena, 1500);
        assert_eq!(again.as_ptr(), room);
        assert!(again.iter().all(|&v| v == 0));
        let room = older.as_ptr();
        drop(older);
        let after = HugeBuf::<u8>::zeroed_in(arena, 10);
        assert_ne!(after.as_ptr(), room);
        assert!(again.iter().all(|&v| v == 0));
    }
}
