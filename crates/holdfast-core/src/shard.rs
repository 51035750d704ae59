//! A fixed set of locks chosen by key hash, so unrelated keys rarely contend.

use std::hash::{BuildHasher, Hash};

/// `N` values of `T` (usually a locked map), one picked per key.
#[derive(Debug)]
pub struct Sharded<T> {
    shards: Box<[T]>,
    hasher: std::collections::hash_map::RandomState,
}

impl<T> Sharded<T> {
    pub fn new(n: usize, make: impl Fn() -> T) -> Self {
        Self {
            shards: (0..n.max(1)).map(|_| make()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The shard of `key`.
    pub fn get<K: Hash + ?Sized>(&self, key: &K) -> &T {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        &self.shards[i]
    }

    /// Every shard.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.shards.iter()
    }
}
