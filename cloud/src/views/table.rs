//! Per-key state in one flat arena, found through a hash index.
//!
//! A key is looked up once ([`KeyTable::slot`]) and its state is then
//! reached by index: a batch of readings resolves all its keys first (the
//! lookups, independent of each other, overlap their cache misses), then
//! updates state by index with the next entries prefetched
//! ([`KeyTable::prefetch`]). Entries of removed keys are reused.

use std::collections::HashMap;

/// A key: stored inline when short (device and user ids are).
pub type Key = compact_str::CompactString;

/// Keys to their state, the state in one `Vec`.
#[derive(Debug)]
pub struct KeyTable<T> {
    index: HashMap<Key, u32, foldhash::fast::RandomState>,
    /// `None` where a removed key's entry waits in `free`.
    entries: Vec<Option<(Key, T)>>,
    free: Vec<u32>,
}

impl<T> Default for KeyTable<T> {
    fn default() -> Self {
        Self { index: HashMap::default(), entries: Vec::new(), free: Vec::new() }
    }
}

impl<T: Default> KeyTable<T> {
    /// The entry of `key`, made (with the default state) if it has none.
    pub fn slot(&mut self, key: &str) -> u32 {
        if let Some(&at) = self.index.get(key) {
            return at;
        }
        let key = Key::from(key);
        let at = match self.free.pop() {
            Some(at) => {
                self.entries[at as usize] = Some((key.clone(), T::default()));
                at
            }
            None => {
                self.entries.push(Some((key.clone(), T::default())));
                // More than 4 billion keys in one view's memory is not a state this process reaches.
                u32::try_from(self.entries.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.index.insert(key, at);
        at
    }
}

impl<T> KeyTable<T> {
    /// The key and state of a live entry.
    ///
    /// # Panics
    /// When `at` is not a live entry's index from [`KeyTable::slot`] (a bug).
    pub fn entry_mut(&mut self, at: u32) -> (&str, &mut T) {
        let (key, value) = self.entries[at as usize].as_mut().expect("a live entry");
        (key.as_str(), value)
    }

    /// The state of a live entry, if `at` is one.
    pub fn get(&self, at: u32) -> Option<&T> {
        self.entries.get(at as usize).and_then(|e| e.as_ref()).map(|(_, v)| v)
    }

    /// Asks the CPU to fetch entry `at` into its cache (a hint: no effect on results).
    pub fn prefetch(&self, at: u32) {
        if let Some(e) = self.entries.get(at as usize) {
            prefetch(e);
        }
    }

    /// Live entries, in no particular order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Key, &mut T)> {
        self.entries.iter_mut().flatten().map(|(k, v)| (&*k, v))
    }

    /// Live entries.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().flatten().map(|(_, v)| v)
    }

    /// Keeps the entries `keep` is true for; the others' indices are reused.
    pub fn retain(&mut self, mut keep: impl FnMut(&Key, &mut T) -> bool) {
        for (at, e) in self.entries.iter_mut().enumerate() {
            if let Some((key, value)) = e
                && !keep(key, value)
            {
                self.index.remove(key.as_str());
                *e = None;
                self.free.push(at as u32);
            }
        }
    }

    /// Live keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

/// Asks the CPU to bring the cache line holding `*p` closer (a hint: it
/// reads no memory and has no effect on results).
#[inline(always)]
#[allow(unsafe_code)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults and reads nothing into
    // the program, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] of every cache line `items` spans.
pub fn prefetch_slice<T>(items: &[T]) {
    const LINE: usize = 64;
    let (start, len) = (items.as_ptr().cast::<u8>(), std::mem::size_of_val(items));
    for off in (0..len).step_by(LINE) {
        prefetch(start.wrapping_add(off));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_entries_and_removed_ones_are_reused() {
        let mut t: KeyTable<Vec<i32>> = KeyTable::default();
        let a = t.slot("a");
        let b = t.slot("b");
        assert_ne!(a, b);
        assert_eq!(t.slot("a"), a, "a known key finds its entry");
        t.entry_mut(a).1.push(1);
        t.entry_mut(b).1.push(2);
        t.retain(|k, _| k.as_str() != "a");
        assert_eq!((t.len(), t.get(a)), (1, None));
        let c = t.slot("c");
        assert_eq!(c, a, "the removed key's entry is reused");
        assert!(t.entry_mut(c).1.is_empty(), "and starts from the default state");
        assert_eq!(t.entry_mut(b), ("b", &mut vec![2]));
        let mut live: Vec<String> = t.iter_mut().map(|(k, _)| k.to_string()).collect();
        live.sort();
        assert_eq!(live, ["b", "c"]);
        // A prefetch of any index is harmless.
        t.prefetch(0);
        t.prefetch(1_000);
        prefetch(std::ptr::null::<u8>());
        prefetch_slice(&[0u64; 100]);
        prefetch_slice::<u8>(&[]);
    }
}
