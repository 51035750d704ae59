//! Fossil delta compression: the encoder for publications sent with `delta: true`, and the decoder the
//! `centrifuge` JS and Python clients run (`applyDelta`).
//!
//! Format: `INT(target_len) "\n"`, then commands `INT(cnt) "@" INT(offset) ","` (copy from the
//! source) or `INT(cnt) ":" <cnt raw bytes>` (insert), then `INT(checksum) ";"`. INT is base-64, most
//! significant digit first, over [`DIGITS`]; zero is `"0"`.

use std::fmt;

/// Block size of the source index; also the rolling hash window.
const NHASH: usize = 16;

/// Hash chain candidates tried per target position (the classic encoder's bound; keeps the work per
/// byte constant when the source repeats itself).
const MAX_CANDIDATES: usize = 250;

/// End of a hash chain.
const NO_BLOCK: usize = usize::MAX;

/// The base-64 alphabet of delta integers.
const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

/// Fossil delta turning `source` into `target`. With `utf8` (JSON connections carry the delta inside a
/// JSON string), every literal insert holds whole UTF-8 characters of `target` so the delta is valid
/// UTF-8 when `target` is; callers pass utf8=true only when target is valid UTF-8.
pub fn delta(source: &[u8], target: &[u8], utf8: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_int(&mut out, target.len());
    out.push(b'\n');

    // Too short to index a single block: nothing can be copied.
    if source.len() < NHASH {
        put_insert(&mut out, target);
        return finish(out, target);
    }

    // Index every full source block. `landmark` holds the newest block per hash bucket and `collide`
    // chains each block to the previous one in its bucket, so memory is two words per block.
    let n_hash = source.len() / NHASH;
    let mut landmark = vec![NO_BLOCK; n_hash];
    let mut collide = vec![NO_BLOCK; n_hash];
    for (block, chunk) in source.chunks_exact(NHASH).enumerate() {
        let bucket = RollingHash::new(chunk).bucket(n_hash);
        collide[block] = landmark[bucket];
        landmark[bucket] = block;
    }

    let mut base = 0;
    while base + NHASH < target.len() {
        let mut hash = RollingHash::new(&target[base..base + NHASH]);
        let mut i = 0;
        loop {
            let at = base + i;
            let mut best: Option<Match> = None;
            let mut block = landmark[hash.bucket(n_hash)];
            let mut tries = MAX_CANDIDATES;
            while block != NO_BLOCK && tries > 0 {
                tries -= 1;
                let src = block * NHASH;
                block = collide[block];

                let fwd = common_prefix(&source[src..], &target[at..]);
                // Extend backward only into bytes not yet emitted (the pending literal).
                let reach = src.min(i);
                let bwd = common_suffix(&source[src - reach..src], &target[at - reach..at]);
                let mut copy = Match {
                    start: at - bwd,
                    end: at + fwd,
                    offset: src - bwd,
                };
                if utf8 {
                    copy.align_to_chars(target);
                }
                let cnt = copy.end - copy.start;
                // A copy must pay for its own command and the insert command it splits off.
                let cost = digit_count(copy.start - base)
                    + digit_count(cnt)
                    + digit_count(copy.offset)
                    + 3;
                if cnt >= cost && best.is_none_or(|b| cnt > b.end - b.start) {
                    best = Some(copy);
                }
            }

            if let Some(copy) = best {
                put_insert(&mut out, &target[base..copy.start]);
                put_int(&mut out, copy.end - copy.start);
                out.push(b'@');
                put_int(&mut out, copy.offset);
                out.push(b',');
                base = copy.end;
                break;
            }
            if at + NHASH >= target.len() {
                put_insert(&mut out, &target[base..]);
                base = target.len();
                break;
            }
            hash.roll(target[at], target[at + NHASH]);
            i += 1;
        }
    }
    put_insert(&mut out, &target[base..]);
    finish(out, target)
}

/// A copy of `target[start..end]` from `source[offset..]`.
#[derive(Clone, Copy)]
struct Match {
    start: usize,
    end: usize,
    offset: usize,
}

impl Match {
    /// Shrinks the copy to whole characters of `target`, so the inserts around it do not split one.
    /// The source bytes are equal to the target bytes over the whole range, so moving the start moves
    /// the offset by the same amount.
    fn align_to_chars(&mut self, target: &[u8]) {
        while self.start < self.end && !is_char_boundary(target, self.start) {
            self.start += 1;
            self.offset += 1;
        }
        while self.end > self.start && !is_char_boundary(target, self.end) {
            self.end -= 1;
        }
    }
}

/// True when `i` does not point into the middle of a UTF-8 sequence.
fn is_char_boundary(b: &[u8], i: usize) -> bool {
    b.get(i).is_none_or(|&c| c & 0xC0 != 0x80)
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

/// Fossil's rolling hash over an `NHASH`-byte window: `a` is the byte sum and `b` the sum weighted by
/// distance from the window's end, both mod 2^16.
struct RollingHash {
    a: u16,
    b: u16,
}

impl RollingHash {
    fn new(window: &[u8]) -> Self {
        let (mut a, mut b) = (0u16, 0u16);
        for &c in window {
            a = a.wrapping_add(u16::from(c));
            b = b.wrapping_add(a);
        }
        Self { a, b }
    }

    /// Slides the window one byte: `old` leaves at the front, `new` enters at the back.
    fn roll(&mut self, old: u8, new: u8) {
        self.a = self
            .a
            .wrapping_sub(u16::from(old))
            .wrapping_add(u16::from(new));
        // NHASH is 16, so the cast cannot truncate.
        let weight = (NHASH as u16).wrapping_mul(u16::from(old));
        self.b = self.b.wrapping_sub(weight).wrapping_add(self.a);
    }

    fn bucket(&self, n: usize) -> usize {
        let v = u32::from(self.a) | (u32::from(self.b) << 16);
        v as usize % n
    }
}

/// Appends an insert command; empty inserts are left out.
fn put_insert(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    put_int(out, bytes.len());
    out.push(b':');
    out.extend_from_slice(bytes);
}

fn finish(mut out: Vec<u8>, target: &[u8]) -> Vec<u8> {
    put_int(&mut out, checksum(target) as usize);
    out.push(b';');
    out
}

fn put_int(out: &mut Vec<u8>, mut v: usize) {
    // 64 bits need at most 11 six-bit digits.
    let mut buf = [0u8; 11];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[v & 63];
        v >>= 6;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn digit_count(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 64 {
        v >>= 6;
        n += 1;
    }
    n
}

/// Wrapping sum of `b` read as big-endian u32 words, the last one zero-padded on the right (the
/// clients' four-lane sum computes exactly this).
fn checksum(b: &[u8]) -> u32 {
    b.chunks(4).fold(0u32, |sum, chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        sum.wrapping_add(u32::from_be_bytes(word))
    })
}

/// Why [`apply`] refused a delta. The messages are the clients' own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyError {
    /// The size line does not end with `\n`.
    SizeNotTerminated,
    /// A copy command is followed by something other than `,`.
    CopyNotTerminated,
    /// A copy would make the output longer than the announced size.
    CopyExceedsOutput,
    /// A copy reads past the end of the source.
    CopyPastEnd,
    /// An insert would make the output longer than the announced size.
    InsertExceedsOutput,
    /// An insert claims more bytes than the delta has left.
    InsertPastEnd,
    /// The checksum does not match the output.
    BadChecksum,
    /// The output is shorter than the announced size.
    SizeMismatch,
    /// A command letter other than `@`, `:` or `;`.
    UnknownOperator,
    /// The delta ends before the checksum command.
    Unterminated,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SizeNotTerminated => "size integer not terminated by '\\n'",
            Self::CopyNotTerminated => "copy command not terminated by ','",
            Self::CopyExceedsOutput => "copy exceeds output file size",
            Self::CopyPastEnd => "copy extends past end of input",
            Self::InsertExceedsOutput => "insert command gives an output larger than predicted",
            Self::InsertPastEnd => "insert count exceeds size of delta",
            Self::BadChecksum => "bad checksum",
            Self::SizeMismatch => "generated size does not match predicted size",
            Self::UnknownOperator => "unknown delta operator",
            Self::Unterminated => "unterminated delta",
        })
    }
}

impl std::error::Error for ApplyError {}

/// Output reserved up front at most; the announced size is untrusted, so a bigger output grows the
/// vector as bytes actually arrive.
const MAX_PREALLOC: u32 = 1 << 20;

/// Applies a delta (the clients' algorithm; used by tests and by anyone checking a delta).
///
/// Integers are read as the clients read them: digits are looked up by the low 7 bits of each byte
/// and the value wraps mod 2^32. The clients also stop at the first `;` and ignore what follows;
/// so does this. A delta cut short is always an error (the clients report some truncations as
/// other errors, but never accept one).
pub fn apply(source: &[u8], delta: &[u8]) -> Result<Vec<u8>, ApplyError> {
    let mut r = Reader { buf: delta, pos: 0 };
    let limit = r.int();
    if r.byte() != Some(b'\n') {
        return Err(ApplyError::SizeNotTerminated);
    }
    let limit = u64::from(limit);
    let mut out = Vec::with_capacity(limit.min(u64::from(MAX_PREALLOC)) as usize);
    let mut total = 0u64;
    while r.pos < delta.len() {
        let cnt = r.int();
        match r.byte() {
            Some(b'@') => {
                let offset = r.int();
                // Like the clients, a copy at the very end needs no ',' (the loop then reports the
                // missing checksum).
                if r.byte().is_some_and(|c| c != b',') {
                    return Err(ApplyError::CopyNotTerminated);
                }
                total += u64::from(cnt);
                if total > limit {
                    return Err(ApplyError::CopyExceedsOutput);
                }
                let end = u64::from(offset) + u64::from(cnt);
                if end > source.len() as u64 {
                    return Err(ApplyError::CopyPastEnd);
                }
                // Both are now known to be within `source`, hence to fit usize.
                out.extend_from_slice(&source[offset as usize..end as usize]);
            }
            Some(b':') => {
                total += u64::from(cnt);
                if total > limit {
                    return Err(ApplyError::InsertExceedsOutput);
                }
                let rest = &delta[r.pos..];
                if u64::from(cnt) > rest.len() as u64 {
                    return Err(ApplyError::InsertPastEnd);
                }
                let cnt = cnt as usize;
                out.extend_from_slice(&rest[..cnt]);
                r.pos += cnt;
            }
            Some(b';') => {
                if cnt != checksum(&out) {
                    return Err(ApplyError::BadChecksum);
                }
                if total != limit {
                    return Err(ApplyError::SizeMismatch);
                }
                return Ok(out);
            }
            Some(_) => return Err(ApplyError::UnknownOperator),
            None => return Err(ApplyError::Unterminated),
        }
    }
    Err(ApplyError::Unterminated)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// Reads digits up to the first non-digit, which is left unread. No digits reads as 0, as in
    /// the clients.
    fn int(&mut self) -> u32 {
        let mut v = 0u32;
        while let Some(&b) = self.buf.get(self.pos) {
            let Some(d) = digit_value(b & 0x7f) else {
                break;
            };
            v = (v << 6).wrapping_add(d);
            self.pos += 1;
        }
        v
    }
}

fn digit_value(c: u8) -> Option<u32> {
    let d = match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'Z' => c - b'A' + 10,
        b'_' => 36,
        b'a'..=b'z' => c - b'a' + 37,
        b'~' => 63,
        _ => return None,
    };
    Some(u32::from(d))
}

#[cfg(test)]
mod tests {
    use super::{ApplyError, DIGITS, apply, checksum, delta, digit_count, digit_value, put_int};

    const SRC: &[u8] = br#"{"a":"hello world"}"#;
    const TGT: &[u8] = br#"{"a":"hello there"}"#;

    /// xorshift64: a reproducible stream without crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    fn check(src: &[u8], tgt: &[u8]) {
        for utf8 in [false, true] {
            let d = delta(src, tgt, utf8);
            assert_eq!(
                apply(src, &d).as_deref(),
                Ok(tgt),
                "utf8={utf8} src={:?} tgt={:?} delta={:?}",
                String::from_utf8_lossy(src),
                String::from_utf8_lossy(tgt),
                String::from_utf8_lossy(&d)
            );
            if utf8 && std::str::from_utf8(tgt).is_ok() {
                assert!(
                    std::str::from_utf8(&d).is_ok(),
                    "delta not UTF-8: {:?}",
                    String::from_utf8_lossy(&d)
                );
            }
        }
    }

    #[test]
    fn worked_example() {
        check(SRC, TGT);
        assert_eq!(apply(SRC, b"J\nC@0,7:there\"}3wF1hP;").as_deref(), Ok(TGT));
        // The literal's checksum is the one this module computes.
        let mut sum = Vec::new();
        put_int(&mut sum, checksum(TGT) as usize);
        assert_eq!(sum, b"3wF1hP");
    }

    #[test]
    fn integers() {
        for v in [
            0usize,
            1,
            63,
            64,
            4095,
            4096,
            1 << 30,
            u32::MAX as usize,
            usize::MAX,
        ] {
            let mut s = Vec::new();
            put_int(&mut s, v);
            assert_eq!(s.len(), digit_count(v), "{v}");
            let back = s.iter().fold(0u128, |acc, &c| {
                (acc << 6) + u128::from(digit_value(c).unwrap_or(99))
            });
            assert_eq!(back, v as u128);
        }
        for (i, &c) in DIGITS.iter().enumerate() {
            assert_eq!(digit_value(c), Some(i as u32));
        }
        let mut s = Vec::new();
        put_int(&mut s, 0);
        assert_eq!(s, b"0");
    }

    #[test]
    fn edge_cases() {
        check(b"", b"");
        check(b"", b"abc");
        check(b"abc", b"");
        check(SRC, b"");
        check(b"", SRC);
        assert_eq!(delta(b"", b"", false), b"0\n0;");
        for n in [15, 16, 17, 31, 32, 33, 47, 48] {
            let src: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            check(&src, &src);
            check(&src, &src[1..]);
            let mut longer = src.clone();
            longer.extend_from_slice(b"tail");
            check(&src, &longer);
        }
        // Highly repetitive input makes long hash chains.
        let src = vec![b'a'; 100_000];
        let tgt = vec![b'a'; 120_000];
        check(&src, &tgt);
        assert!(delta(&src, &tgt, false).len() < 2_000);
    }

    #[test]
    fn utf8_alignment() {
        // "ĩ" (C4 A9) shares its last byte with "é" (C3 A9), and the source's blocks start on the
        // second byte of "é": a byte-level copy starts inside "ĩ" and leaves its lone lead byte C4
        // as a literal.
        let src = format!("x{}", "é".repeat(20));
        let tgt = format!("ĩ{}", "é".repeat(20));
        let bytewise = delta(src.as_bytes(), tgt.as_bytes(), false);
        assert!(std::str::from_utf8(&bytewise).is_err());
        let aligned = delta(src.as_bytes(), tgt.as_bytes(), true);
        assert!(std::str::from_utf8(&aligned).is_ok());
        assert_eq!(
            apply(src.as_bytes(), &aligned).as_deref(),
            Ok(tgt.as_bytes())
        );
        // Only the partial character moved into the literal: `2:ĩO@H,…`.
        assert!(
            aligned.starts_with("f\n2:ĩO@H,".as_bytes()),
            "{}",
            String::from_utf8_lossy(&aligned)
        );
    }

    #[test]
    fn growing_answer() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let words = [
            "the",
            "model",
            "answers",
            "with",
            "tokens",
            "streaming",
            "ünïcode",
            "✓",
        ];
        let mut src = String::from(r#"{"answer":""#);
        while src.len() < 4096 {
            src.push_str(words[rng.below(words.len())]);
            src.push(' ');
        }
        let tgt = format!("{src} a few words");
        for utf8 in [false, true] {
            let d = delta(src.as_bytes(), tgt.as_bytes(), utf8);
            assert_eq!(apply(src.as_bytes(), &d).as_deref(), Ok(tgt.as_bytes()));
            assert!(
                d.len() * 10 < tgt.len(),
                "delta {} bytes for {}",
                d.len(),
                tgt.len()
            );
        }
    }

    #[test]
    fn rejects_bad_deltas() {
        let good = delta(SRC, TGT, false);
        assert_eq!(apply(SRC, &good).as_deref(), Ok(TGT));

        // Checksum off by one.
        let literal: &[u8] = b"J\nC@0,7:there\"}3wF1hP;";
        assert_eq!(
            apply(SRC, b"J\nC@0,7:there\"}3wF1hQ;"),
            Err(ApplyError::BadChecksum)
        );
        // Every proper prefix is refused.
        for n in 0..literal.len() {
            assert!(apply(SRC, &literal[..n]).is_err(), "prefix {n} accepted");
        }
        for n in 0..good.len() {
            assert!(apply(SRC, &good[..n]).is_err(), "prefix {n} accepted");
        }
        assert_eq!(apply(SRC, b"J\nC@0,"), Err(ApplyError::Unterminated));
        assert_eq!(apply(SRC, b"J\nC@0"), Err(ApplyError::Unterminated));
        // Copy past the end of the source (19 bytes).
        assert_eq!(apply(SRC, b"K\nK@0,0;"), Err(ApplyError::CopyPastEnd));
        assert_eq!(apply(SRC, b"2\n2@I,0;"), Err(ApplyError::CopyPastEnd));
        // Output longer than announced.
        assert_eq!(apply(SRC, b"1\n2@0,0;"), Err(ApplyError::CopyExceedsOutput));
        assert_eq!(
            apply(SRC, b"1\n2:ab0;"),
            Err(ApplyError::InsertExceedsOutput)
        );
        // Insert claims more bytes than remain.
        assert_eq!(apply(SRC, b"9\n9:ab"), Err(ApplyError::InsertPastEnd));
        // Output shorter than announced (checksum of "ab" is right).
        let mut short = b"3\n2:ab".to_vec();
        put_int(&mut short, checksum(b"ab") as usize);
        short.push(b';');
        assert_eq!(apply(SRC, &short), Err(ApplyError::SizeMismatch));
        assert_eq!(apply(SRC, b"J C@0,"), Err(ApplyError::SizeNotTerminated));
        assert_eq!(apply(SRC, b"J\nC#0,"), Err(ApplyError::UnknownOperator));
        assert_eq!(apply(SRC, b"J\nC@0;"), Err(ApplyError::CopyNotTerminated));
        assert_eq!(ApplyError::BadChecksum.to_string(), "bad checksum");
    }

    /// Text alphabet with 1- to 4-byte characters.
    const CHARS: &[char] = &[
        'a', 'b', 'c', 'e', 'h', 'l', 'o', ' ', ' ', '"', '{', '}', ':', ',', 'é', 'ö', 'ü', 'ĩ',
        '✓', '日', '本', '語', '😀',
    ];
    const WORDS: &[&str] = &[
        "hello", "wörld", "✓", "日本", "the", "answer", "is", "42", "😀",
    ];

    fn random_text(rng: &mut Rng, max_chars: usize) -> Vec<char> {
        let n = rng.below(max_chars + 1);
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            if rng.chance(50) {
                v.extend(WORDS[rng.below(WORDS.len())].chars());
                v.push(' ');
            } else {
                v.push(CHARS[rng.below(CHARS.len())]);
            }
        }
        v
    }

    fn random_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
        let n = rng.below(max + 1);
        // Small alphabets make accidental matches; full-range bytes make invalid UTF-8.
        let span = [4usize, 16, 256][rng.below(3)];
        (0..n)
            .map(|_| rng.below(span) as u8 + if span < 256 { b'a' } else { 0 })
            .collect()
    }

    /// Insert/delete/replace runs, applied to any element type.
    fn edit<T: Clone>(
        rng: &mut Rng,
        src: &[T],
        fresh: &mut dyn FnMut(&mut Rng) -> Vec<T>,
    ) -> Vec<T> {
        let mut v = src.to_vec();
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(v.len() + 1);
            match rng.below(3) {
                0 => {
                    let ins = fresh(rng);
                    v.splice(at..at, ins);
                }
                1 => {
                    let end = (at + rng.below(40)).min(v.len());
                    v.drain(at..end);
                }
                _ => {
                    let end = (at + rng.below(40)).min(v.len());
                    let ins = fresh(rng);
                    v.splice(at..end, ins);
                }
            }
        }
        v
    }

    #[test]
    fn random_round_trips() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..2000 {
            let text = rng.chance(60);
            let max = if rng.chance(20) { 3000 } else { 300 };
            let (src, tgt): (Vec<u8>, Vec<u8>) = if text {
                let s = random_text(&mut rng, max);
                let t = match case % 5 {
                    0 | 1 => edit(&mut rng, &s, &mut |r: &mut Rng| random_text(r, 20)),
                    2 => {
                        let mut t = s.clone();
                        for _ in 0..1 + rng.below(10) {
                            t.push(' ');
                            t.extend(WORDS[rng.below(WORDS.len())].chars());
                        }
                        t
                    }
                    3 => random_text(&mut rng, 300),
                    _ => Vec::new(),
                };
                let s: String = if case % 7 == 0 {
                    String::new()
                } else {
                    s.into_iter().collect()
                };
                (
                    s.into_bytes(),
                    t.into_iter().collect::<String>().into_bytes(),
                )
            } else {
                let s = random_bytes(&mut rng, max);
                let t = match case % 4 {
                    0 | 1 => edit(&mut rng, &s, &mut |r: &mut Rng| random_bytes(r, 20)),
                    2 => random_bytes(&mut rng, 300),
                    _ => {
                        let mut t = s.clone();
                        t.extend_from_slice(b" and a few more words");
                        t
                    }
                };
                let s = if case % 9 == 0 { Vec::new() } else { s };
                (s, t)
            };
            check(&src, &tgt);
        }
    }
}
