//! Key and channel names: prefix, hash-tag partitions, and the instance a channel lives on.

/// Key and channel names.
#[derive(Debug)]
pub(crate) struct Keys {
    prefix: String,
    partitions: u32,
    instances: usize,
    control: String,
}

/// FNV-1a: stable across versions and machines (every node must agree).
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash (Lamping & Veach): adding an instance moves only 1/n of the channels.
fn jump(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    let n = buckets as i64;
    while j < n {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

impl Keys {
    pub(crate) fn new(prefix: &str, partitions: u32, instances: usize) -> Self {
        Self {
            prefix: prefix.to_owned(),
            partitions,
            instances,
            control: format!("{prefix}:{{ctl}}"),
        }
    }
    pub(crate) fn partition(&self, ch: &str) -> u32 {
        (fnv(ch) % u64::from(self.partitions)) as u32
    }
    pub(crate) fn instance(&self, ch: &str) -> usize {
        if self.instances <= 1 {
            0
        } else {
            jump(fnv(ch).rotate_left(17), self.instances)
        }
    }
    pub(crate) fn key(&self, kind: &str, ch: &str) -> String {
        format!("{}:{{{}}}:{kind}:{ch}", self.prefix, self.partition(ch))
    }
    pub(crate) fn stream(&self, ch: &str) -> String {
        self.key("s", ch)
    }
    pub(crate) fn meta(&self, ch: &str) -> String {
        self.key("m", ch)
    }
    pub(crate) fn pubsub(&self, ch: &str) -> String {
        self.key("c", ch)
    }
    pub(crate) fn presence_hash(&self, ch: &str) -> String {
        self.key("ph", ch)
    }
    pub(crate) fn presence_zset(&self, ch: &str) -> String {
        self.key("pz", ch)
    }
    pub(crate) fn idempotency(&self, ch: &str, key: &str) -> String {
        format!(
            "{}:{{{}}}:i:{}:{ch}:{key}",
            self.prefix,
            self.partition(ch),
            ch.len()
        )
    }
    pub(crate) fn cursor(&self, user: &str, ch: &str) -> String {
        format!(
            "{}:{{{}}}:u:{}:{user}:{ch}",
            self.prefix,
            self.partition(ch),
            user.len()
        )
    }
    /// A map channel's keys, in the order the map scripts take them (see `scripts::map_lib`):
    /// stream, meta, state, key order, key expiries, versions, the partition's expiring set.
    pub(crate) fn map(&self, ch: &str) -> [String; 7] {
        [
            self.stream(ch),
            self.meta(ch),
            self.key("ms", ch),
            self.key("mo", ch),
            self.key("mx", ch),
            self.key("mv", ch),
            self.map_expiring(self.partition(ch)),
        ]
    }
    /// A partition's map channels with expiring keys (channel → earliest expiry).
    pub(crate) fn map_expiring(&self, partition: u32) -> String {
        format!("{}:{{{partition}}}:mexp", self.prefix)
    }
    pub(crate) fn partitions(&self) -> u32 {
        self.partitions
    }
    pub(crate) fn instances(&self) -> usize {
        self.instances.max(1)
    }
    pub(crate) fn control(&self) -> &str {
        &self.control
    }
    /// The node channel of a pub/sub channel name.
    pub(crate) fn channel_of<'a>(&self, name: &'a [u8]) -> Option<&'a str> {
        let rest = name
            .strip_prefix(self.prefix.as_bytes())?
            .strip_prefix(b":{")?;
        let close = rest.iter().position(|&b| b == b'}')?;
        let rest = rest[close..].strip_prefix(b"}:c:")?;
        std::str::from_utf8(rest).ok()
    }
}
