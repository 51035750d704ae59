//! Publication tag filters: the `tf` field of a subscribe request (the clients' `FilterNode`),
//! validated and compiled once, then matched against every publication's tags.
//!
//! Semantics follow Centrifugo's `filter.Match` / `filter.Validate`, with two additions: bounds on the
//! tree's size (Centrifugo has none beyond the frame size) and numeric `val`s checked at compile time.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

pub use holdfast_protocol::FilterNode;

/// A validated, compiled filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Every child matches.
    And(Vec<Filter>),
    /// At least one child matches.
    Or(Vec<Filter>),
    /// The child does not match.
    Not(Box<Filter>),
    /// One comparison on the tag `key`.
    Leaf {
        /// Tag name.
        key: String,
        /// What the tag's value must satisfy.
        cmp: Cmp,
    },
}

/// A leaf comparison. String comparisons are byte-wise and case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cmp {
    /// The tag is present and equal.
    Eq(String),
    /// The tag is missing or different.
    Neq(String),
    /// The tag's value (`""` when missing) is one of these (sorted, deduplicated).
    In(Vec<String>),
    /// The tag's value (`""` when missing) is none of these (sorted, deduplicated).
    Nin(Vec<String>),
    /// The tag is present.
    Ex,
    /// The tag is missing.
    Nex,
    /// The tag is present and starts with this.
    Sw(String),
    /// The tag is present and ends with this.
    Ew(String),
    /// The tag is present and contains this.
    Ct(String),
    /// The tag is a number below this.
    Lt(Decimal),
    /// The tag is a number at most this.
    Lte(Decimal),
    /// The tag is a number above this.
    Gt(Decimal),
    /// The tag is a number at least this.
    Gte(Decimal),
}

/// Size bounds a client filter must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Levels of nesting, the root being level 1.
    pub max_depth: usize,
    /// Nodes in the whole tree.
    pub max_nodes: usize,
    /// Entries of `vals` over the whole tree.
    pub max_vals: usize,
    /// Bytes of all `key`, `val` and `vals` strings together.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 16,
            max_nodes: 128,
            max_vals: 1024,
            max_bytes: 16384,
        }
    }
}

/// Why a filter was refused; the message is the reason (the subscribe is refused as a bad request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError(pub String);

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FilterError {}

fn err<T>(reason: impl fmt::Display) -> Result<T, FilterError> {
    Err(FilterError(format!("tags filter: {reason}")))
}

/// Quotes client text for an error message, cut short so a hostile op or cmp cannot bloat the reply.
fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 32;
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// Running totals checked against [`Limits`] while compiling.
struct Budget<'a> {
    limits: &'a Limits,
    nodes: usize,
    vals: usize,
    bytes: usize,
}

impl Budget<'_> {
    fn node(&mut self) -> Result<(), FilterError> {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return err(format_args!("more than {} nodes", self.limits.max_nodes));
        }
        Ok(())
    }

    fn strings(&mut self, node: &FilterNode) -> Result<(), FilterError> {
        self.vals = self.vals.saturating_add(node.vals.len());
        if self.vals > self.limits.max_vals {
            return err(format_args!("more than {} vals", self.limits.max_vals));
        }
        let bytes =
            node.vals.iter().map(String::len).sum::<usize>() + node.key.len() + node.val.len();
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes > self.limits.max_bytes {
            return err(format_args!(
                "more than {} bytes of keys and values",
                self.limits.max_bytes
            ));
        }
        Ok(())
    }
}

/// Which operands a comparison takes.
enum Operand {
    Val,
    Vals,
    Neither,
}

impl Filter {
    /// Validates `node` against Centrifugo's rules and `limits` and compiles it.
    ///
    /// Recursion stops at `limits.max_depth`, so an arbitrarily deep input only costs that many
    /// stack frames.
    pub fn compile(node: &FilterNode, limits: &Limits) -> Result<Filter, FilterError> {
        let mut budget = Budget {
            limits,
            nodes: 0,
            vals: 0,
            bytes: 0,
        };
        compile_node(node, 1, &mut budget)
    }

    /// Whether a publication with these tags (`None`: no tags at all) passes the filter.
    pub fn matches(&self, tags: Option<&BTreeMap<String, String>>) -> bool {
        match self {
            Filter::And(children) => children.iter().all(|f| f.matches(tags)),
            Filter::Or(children) => children.iter().any(|f| f.matches(tags)),
            Filter::Not(child) => !child.matches(tags),
            Filter::Leaf { key, cmp } => {
                let v = tags.and_then(|t| t.get(key)).map(String::as_str);
                cmp.matches(v)
            }
        }
    }

    /// Both must match (a server-side filter the client cannot widen, AND the client's).
    ///
    /// `self` is evaluated first, so pass the server's filter as `self`.
    pub fn and(self, other: Filter) -> Filter {
        match self {
            // Flattening keeps repeated combination from nesting deeper each time.
            Filter::And(mut children) => {
                children.push(other);
                Filter::And(children)
            }
            first => Filter::And(vec![first, other]),
        }
    }
}

impl Cmp {
    /// Evaluates against the tag's value, `None` when the publication lacks the tag.
    fn matches(&self, v: Option<&str>) -> bool {
        match self {
            Cmp::Eq(val) => v == Some(val.as_str()),
            Cmp::Neq(val) => v != Some(val.as_str()),
            // A missing tag compares as "" (Centrifugo reads the zero value of the map lookup).
            Cmp::In(vals) => contains(vals, v.unwrap_or("")),
            Cmp::Nin(vals) => !contains(vals, v.unwrap_or("")),
            Cmp::Ex => v.is_some(),
            Cmp::Nex => v.is_none(),
            Cmp::Sw(val) => v.is_some_and(|v| v.starts_with(val.as_str())),
            Cmp::Ew(val) => v.is_some_and(|v| v.ends_with(val.as_str())),
            Cmp::Ct(val) => v.is_some_and(|v| v.contains(val.as_str())),
            Cmp::Lt(d) => compare(v, d, Ordering::is_lt),
            Cmp::Lte(d) => compare(v, d, Ordering::is_le),
            Cmp::Gt(d) => compare(v, d, Ordering::is_gt),
            Cmp::Gte(d) => compare(v, d, Ordering::is_ge),
        }
    }
}

fn contains(sorted: &[String], v: &str) -> bool {
    sorted.binary_search_by(|x| x.as_str().cmp(v)).is_ok()
}

/// A missing tag or one that is not a number never matches a numeric comparison.
fn compare(v: Option<&str>, bound: &Decimal, ok: fn(Ordering) -> bool) -> bool {
    v.and_then(Decimal::parse).is_some_and(|v| ok(v.cmp(bound)))
}

fn compile_node(
    node: &FilterNode,
    depth: usize,
    budget: &mut Budget<'_>,
) -> Result<Filter, FilterError> {
    // Checked before looking at the children, so recursion never goes past max_depth + 1.
    if depth > budget.limits.max_depth {
        return err(format_args!(
            "nested deeper than {} levels",
            budget.limits.max_depth
        ));
    }
    budget.node()?;
    budget.strings(node)?;

    let op = node.op.as_str();
    if op.is_empty() {
        return compile_leaf(node);
    }
    if !matches!(op, "and" | "or" | "not") {
        return err(format_args!("unknown op {}", quoted(op)));
    }
    // Strict: fields a logical node ignores are a client mistake worth reporting.
    for (field, set) in [
        ("key", !node.key.is_empty()),
        ("cmp", !node.cmp.is_empty()),
        ("val", !node.val.is_empty()),
        ("vals", !node.vals.is_empty()),
    ] {
        if set {
            return err(format_args!("{op} node must not have {field}"));
        }
    }
    if op == "not" {
        let [child] = node.nodes.as_slice() else {
            return err("not node requires exactly one child");
        };
        return Ok(Filter::Not(Box::new(compile_node(
            child,
            depth + 1,
            budget,
        )?)));
    }
    if node.nodes.is_empty() {
        return err(format_args!("{op} node requires at least one child"));
    }
    let children = node
        .nodes
        .iter()
        .map(|child| compile_node(child, depth + 1, budget))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if op == "and" {
        Filter::And(children)
    } else {
        Filter::Or(children)
    })
}

fn compile_leaf(node: &FilterNode) -> Result<Filter, FilterError> {
    if !node.nodes.is_empty() {
        return err("leaf node must not have nodes");
    }
    let name = node.cmp.as_str();
    let operand = match name {
        "" => return err("leaf node must have cmp set"),
        "eq" | "neq" | "sw" | "ew" | "ct" | "starts" | "ends" | "contains" | "lt" | "lte"
        | "gt" | "gte" => Operand::Val,
        "in" | "nin" => Operand::Vals,
        "ex" | "nex" => Operand::Neither,
        _ => return err(format_args!("unknown cmp {}", quoted(name))),
    };
    // ex/nex may test the empty key; every other comparison names a tag.
    if node.key.is_empty() && !matches!(operand, Operand::Neither) {
        return err("leaf node requires key");
    }
    match operand {
        Operand::Val => {
            if node.val.is_empty() {
                return err(format_args!("{name} requires val"));
            }
            if !node.vals.is_empty() {
                return err(format_args!("{name} does not take vals"));
            }
        }
        Operand::Vals => {
            if node.vals.is_empty() {
                return err(format_args!("{name} requires vals"));
            }
            if !node.val.is_empty() {
                return err(format_args!("{name} does not take val"));
            }
        }
        Operand::Neither => {
            if !node.val.is_empty() {
                return err(format_args!("{name} does not take val"));
            }
            if !node.vals.is_empty() {
                return err(format_args!("{name} does not take vals"));
            }
        }
    }

    let number = || match Decimal::parse(&node.val) {
        Some(d) => Ok(d),
        None => err(format_args!("val of {name} is not a number")),
    };
    let set = || {
        let mut vals = node.vals.clone();
        vals.sort_unstable();
        vals.dedup();
        vals
    };
    let val = || node.val.clone();
    let cmp = match name {
        "eq" => Cmp::Eq(val()),
        "neq" => Cmp::Neq(val()),
        "in" => Cmp::In(set()),
        "nin" => Cmp::Nin(set()),
        "ex" => Cmp::Ex,
        "nex" => Cmp::Nex,
        "sw" | "starts" => Cmp::Sw(val()),
        "ew" | "ends" => Cmp::Ew(val()),
        "ct" | "contains" => Cmp::Ct(val()),
        "lt" => Cmp::Lt(number()?),
        "lte" => Cmp::Lte(number()?),
        "gt" => Cmp::Gt(number()?),
        // Only "gte" is left: the names were checked above.
        _ => Cmp::Gte(number()?),
    };
    Ok(Filter::Leaf {
        key: node.key.clone(),
        cmp,
    })
}

/// An exact decimal number of any length: `[+-]?digits[.digits]`, with ".5" and "5." allowed (at
/// least one digit in all). No exponent, whitespace, NaN or infinity.
///
/// Kept normalised (no leading zeros in the integer part, no trailing zeros in the fraction, zero
/// never negative), so the derived equality and hash are numeric equality.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decimal {
    negative: bool,
    /// Integer digits, ASCII, without leading zeros (empty for 0).
    int: Box<str>,
    /// Fraction digits, ASCII, without trailing zeros.
    frac: Box<str>,
}

impl Decimal {
    /// Parses the text form; `None` when it is not a plain decimal number.
    pub fn parse(s: &str) -> Option<Decimal> {
        let (negative, rest) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
        let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return None;
        }
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        Some(Decimal {
            negative: negative && !(int.is_empty() && frac.is_empty()),
            int: int.into(),
            frac: frac.into(),
        })
    }

    fn cmp_magnitude(&self, other: &Self) -> Ordering {
        // Without leading zeros a longer integer part is a larger one; normalised fractions compare
        // digit by digit, a missing digit being a zero.
        self.int
            .len()
            .cmp(&other.int.len())
            .then_with(|| self.int.cmp(&other.int))
            .then_with(|| self.frac.cmp(&other.frac))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.cmp_magnitude(other),
            (true, true) => other.cmp_magnitude(self),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.negative {
            f.write_str("-")?;
        }
        f.write_str(if self.int.is_empty() { "0" } else { &self.int })?;
        if !self.frac.is_empty() {
            write!(f, ".{}", self.frac)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Cmp, Decimal, Filter, FilterNode, Limits};
    use std::collections::BTreeMap;

    fn leaf(key: &str, cmp: &str, val: &str) -> FilterNode {
        FilterNode {
            key: key.into(),
            cmp: cmp.into(),
            val: val.into(),
            ..FilterNode::default()
        }
    }

    fn leaf_vals(key: &str, cmp: &str, vals: &[&str]) -> FilterNode {
        FilterNode {
            key: key.into(),
            cmp: cmp.into(),
            vals: vals.iter().map(|v| v.to_string()).collect(),
            ..FilterNode::default()
        }
    }

    fn logical(op: &str, nodes: Vec<FilterNode>) -> FilterNode {
        FilterNode {
            op: op.into(),
            nodes,
            ..FilterNode::default()
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn compile(node: &FilterNode) -> Filter {
        match Filter::compile(node, &Limits::default()) {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        }
    }

    fn error(node: &FilterNode) -> String {
        match Filter::compile(node, &Limits::default()) {
            Ok(f) => panic!("accepted {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Matches against `t`, against no tags at all, and against an empty map.
    fn m(node: &FilterNode, t: &[(&str, &str)]) -> bool {
        let f = compile(node);
        let t = tags(t);
        if t.is_empty() {
            let none = f.matches(None);
            assert_eq!(none, f.matches(Some(&t)), "None and empty map differ");
            none
        } else {
            f.matches(Some(&t))
        }
    }

    #[test]
    fn string_operators() {
        let t = [("a", "hello"), ("e", "")];
        assert!(m(&leaf("a", "eq", "hello"), &t));
        assert!(!m(&leaf("a", "eq", "hell"), &t));
        assert!(!m(&leaf("x", "eq", "hello"), &t));
        assert!(!m(&leaf("a", "eq", "hello"), &[]));

        assert!(!m(&leaf("a", "neq", "hello"), &t));
        assert!(m(&leaf("a", "neq", "hell"), &t));
        assert!(m(&leaf("x", "neq", "hello"), &t), "missing key matches neq");
        assert!(m(&leaf("a", "neq", "x"), &[]));

        for sw in ["sw", "starts"] {
            assert!(m(&leaf("a", sw, "he"), &t));
            assert!(m(&leaf("a", sw, "hello"), &t));
            assert!(!m(&leaf("a", sw, "lo"), &t));
            assert!(!m(&leaf("a", sw, "He"), &t), "case-sensitive");
            assert!(!m(&leaf("x", sw, "he"), &t));
        }
        for ew in ["ew", "ends"] {
            assert!(m(&leaf("a", ew, "llo"), &t));
            assert!(!m(&leaf("a", ew, "he"), &t));
            assert!(!m(&leaf("x", ew, "llo"), &t));
        }
        for ct in ["ct", "contains"] {
            assert!(m(&leaf("a", ct, "ell"), &t));
            assert!(!m(&leaf("a", ct, "xyz"), &t));
            assert!(!m(&leaf("x", ct, "ell"), &t));
        }
        assert_eq!(
            compile(&leaf("a", "starts", "x")),
            compile(&leaf("a", "sw", "x"))
        );

        assert!(m(&leaf_vals("a", "in", &["x", "hello"]), &t));
        assert!(!m(&leaf_vals("a", "in", &["x", "y"]), &t));
        assert!(!m(&leaf_vals("x", "in", &["x", "y"]), &t));
        assert!(
            m(&leaf_vals("x", "in", &["x", ""]), &t),
            "missing key reads as \"\""
        );
        assert!(m(&leaf_vals("e", "in", &[""]), &t));

        assert!(!m(&leaf_vals("a", "nin", &["x", "hello"]), &t));
        assert!(m(&leaf_vals("a", "nin", &["x", "y"]), &t));
        assert!(
            m(&leaf_vals("x", "nin", &["x", "y"]), &t),
            "missing key matches nin"
        );
        assert!(!m(&leaf_vals("x", "nin", &["x", ""]), &t));

        assert!(m(&leaf("a", "ex", ""), &t));
        assert!(m(&leaf("e", "ex", ""), &t), "present with empty value");
        assert!(!m(&leaf("x", "ex", ""), &t));
        assert!(!m(&leaf("a", "ex", ""), &[]));
        assert!(!m(&leaf("a", "nex", ""), &t));
        assert!(m(&leaf("x", "nex", ""), &t));
        assert!(m(&leaf("a", "nex", ""), &[]));
        // ex/nex without a key test the key "".
        assert!(!m(&leaf("", "ex", ""), &t));
        assert!(m(&leaf("", "ex", ""), &[("", "v")]));
        assert!(m(&leaf("", "nex", ""), &t));
    }

    #[test]
    fn in_sets_are_sorted_and_deduplicated() {
        let f = compile(&leaf_vals("a", "in", &["b", "a", "b", "c"]));
        assert_eq!(
            f,
            Filter::Leaf {
                key: "a".into(),
                cmp: Cmp::In(vec!["a".into(), "b".into(), "c".into()])
            }
        );
        assert_eq!(f, compile(&leaf_vals("a", "in", &["c", "b", "a"])));
    }

    #[test]
    fn numeric_operators() {
        let t = [("n", "10"), ("f", "-1.50"), ("s", "abc"), ("e", "")];
        assert!(m(&leaf("n", "gt", "9"), &t), "numeric, not string, order");
        assert!(!m(&leaf("n", "lt", "9"), &t));
        assert!(m(&leaf("n", "gte", "10"), &t));
        assert!(m(&leaf("n", "lte", "10.0"), &t));
        assert!(!m(&leaf("n", "gt", "10"), &t));
        assert!(!m(&leaf("n", "lt", "10"), &t));
        assert!(m(&leaf("f", "gte", "-1.5"), &t));
        assert!(m(&leaf("f", "lte", "-1.5"), &t));
        assert!(!m(&leaf("f", "lt", "-1.5"), &t));
        assert!(m(&leaf("f", "lt", "-1.49"), &t));
        assert!(m(&leaf("f", "gt", "-2"), &t));
        for cmp in ["lt", "lte", "gt", "gte"] {
            assert!(!m(&leaf("s", cmp, "0"), &t), "{cmp}: non-number tag");
            assert!(!m(&leaf("e", cmp, "0"), &t), "{cmp}: empty tag");
            assert!(!m(&leaf("x", cmp, "0"), &t), "{cmp}: missing tag");
            assert!(!m(&leaf("n", cmp, "0"), &[]), "{cmp}: no tags");
        }
        // Arbitrary length stays exact.
        let big = [("b", "123456789012345678901234567890.000000000000000000001")];
        assert!(m(&leaf("b", "gt", "123456789012345678901234567890"), &big));
        assert!(m(
            &leaf(
                "b",
                "lt",
                "123456789012345678901234567890.00000000000000000001"
            ),
            &big
        ));
    }

    #[test]
    fn decimals() {
        let d = |s: &str| Decimal::parse(s);
        for (a, b) in [
            ("-1.50", "-1.5"),
            ("0", "-0"),
            ("-0.000", "+0"),
            ("007", "7"),
            (".5", "0.5"),
            ("5.", "5"),
            ("00.100", ".1"),
        ] {
            assert_eq!(d(a), d(b), "{a} == {b}");
            assert!(d(a).is_some());
        }
        for bad in [
            "", "+", "-", ".", "-.", "1.2.3", "1e5", " 1", "1 ", "NaN", "inf", "--1", "0x10", "١",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
        let order = [
            "-100", "-10.5", "-10", "-9.99", "-1.5", "-1", "-0.5", "-0.05", "0", "0.05", "0.5",
            "0.51", "1", "9", "9.5", "10", "10.01", "100",
        ];
        for (i, a) in order.iter().enumerate() {
            for (j, b) in order.iter().enumerate() {
                assert_eq!(d(a).cmp(&d(b)), i.cmp(&j), "{a} vs {b}");
            }
        }
        assert_eq!(
            d("-001.2300").map(|x| x.to_string()).as_deref(),
            Some("-1.23")
        );
        assert_eq!(d("-0.0").map(|x| x.to_string()).as_deref(), Some("0"));
    }

    #[test]
    fn logical_operators() {
        let t = [("a", "1"), ("b", "2")];
        let a1 = leaf("a", "eq", "1");
        let b3 = leaf("b", "eq", "3");
        assert!(!m(&logical("and", vec![a1.clone(), b3.clone()]), &t));
        assert!(m(&logical("or", vec![a1.clone(), b3.clone()]), &t));
        assert!(m(&logical("not", vec![b3.clone()]), &t));
        assert!(m(&logical("and", vec![a1.clone()]), &t));
        assert!(!m(
            &logical("not", vec![logical("or", vec![a1.clone(), b3.clone()])]),
            &t
        ));

        let server = compile(&a1);
        let client = compile(&b3);
        let both = server.clone().and(client.clone());
        assert!(!both.matches(Some(&tags(&t))));
        assert!(both.matches(Some(&tags(&[("a", "1"), ("b", "3")]))));
        let three = both.and(compile(&leaf("c", "nex", "")));
        assert_eq!(
            three,
            Filter::And(vec![server, client, compile(&leaf("c", "nex", ""))])
        );
    }

    #[test]
    fn validation_errors() {
        let cases: Vec<(FilterNode, &str)> = vec![
            (
                logical("xor", vec![leaf("a", "ex", "")]),
                "unknown op \"xor\"",
            ),
            (
                logical("and", vec![]),
                "and node requires at least one child",
            ),
            (logical("or", vec![]), "or node requires at least one child"),
            (
                logical("not", vec![]),
                "not node requires exactly one child",
            ),
            (
                logical("not", vec![leaf("a", "ex", ""), leaf("b", "ex", "")]),
                "not node requires exactly one child",
            ),
            (
                FilterNode {
                    key: "a".into(),
                    ..logical("and", vec![leaf("a", "ex", "")])
                },
                "and node must not have key",
            ),
            (
                FilterNode {
                    cmp: "eq".into(),
                    ..logical("or", vec![leaf("a", "ex", "")])
                },
                "or node must not have cmp",
            ),
            (
                FilterNode {
                    val: "x".into(),
                    ..logical("not", vec![leaf("a", "ex", "")])
                },
                "not node must not have val",
            ),
            (
                FilterNode {
                    vals: vec!["x".into()],
                    ..logical("and", vec![leaf("a", "ex", "")])
                },
                "and node must not have vals",
            ),
            (leaf("a", "", "x"), "leaf node must have cmp set"),
            (FilterNode::default(), "leaf node must have cmp set"),
            (leaf("a", "like", "x"), "unknown cmp \"like\""),
            (leaf("a", "EQ", "x"), "unknown cmp \"EQ\""),
            (leaf("", "eq", "x"), "leaf node requires key"),
            (leaf_vals("", "in", &["x"]), "leaf node requires key"),
            (leaf("a", "eq", ""), "eq requires val"),
            (leaf("a", "gt", ""), "gt requires val"),
            (leaf("a", "contains", ""), "contains requires val"),
            (
                FilterNode {
                    vals: vec!["y".into()],
                    ..leaf("a", "neq", "x")
                },
                "neq does not take vals",
            ),
            (leaf_vals("a", "in", &[]), "in requires vals"),
            (
                FilterNode {
                    val: "x".into(),
                    ..leaf_vals("a", "nin", &["y"])
                },
                "nin does not take val",
            ),
            (leaf("a", "ex", "x"), "ex does not take val"),
            (leaf_vals("a", "nex", &["x"]), "nex does not take vals"),
            (
                FilterNode {
                    nodes: vec![leaf("b", "ex", "")],
                    ..leaf("a", "ex", "")
                },
                "leaf node must not have nodes",
            ),
            (leaf("a", "gt", "abc"), "val of gt is not a number"),
            (leaf("a", "lte", "1e3"), "val of lte is not a number"),
            (leaf("a", "lt", " 1"), "val of lt is not a number"),
            // Errors deep in the tree surface too.
            (
                logical(
                    "and",
                    vec![
                        leaf("a", "ex", ""),
                        logical("or", vec![leaf("b", "gte", "x")]),
                    ],
                ),
                "val of gte is not a number",
            ),
        ];
        for (node, want) in cases {
            assert_eq!(error(&node), format!("tags filter: {want}"), "{node:?}");
        }
        let long = "x".repeat(100);
        let msg = error(&logical(&long, vec![]));
        assert!(msg.len() < 80, "{msg}");
    }

    /// Drops a deep chain one level at a time; the recursive drop glue could overflow the stack.
    fn dismantle(mut node: FilterNode) {
        while let Some(child) = node.nodes.pop() {
            node = child;
        }
    }

    #[test]
    fn bounds() {
        let limits = Limits::default();
        // 10,000 levels, built iteratively.
        let mut deep = leaf("a", "ex", "");
        for i in 0..10_000 {
            deep = logical(if i % 2 == 0 { "not" } else { "and" }, vec![deep]);
        }
        assert_eq!(
            Filter::compile(&deep, &limits).map_err(|e| e.to_string()),
            Err("tags filter: nested deeper than 16 levels".to_string())
        );
        dismantle(deep);

        // Exactly max_depth levels pass; one more fails.
        let chain = |levels: usize| {
            let mut n = leaf("a", "ex", "");
            for _ in 1..levels {
                n = logical("not", vec![n]);
            }
            n
        };
        assert!(Filter::compile(&chain(16), &limits).is_ok());
        assert!(Filter::compile(&chain(17), &limits).is_err());

        let many_vals: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
        let refs: Vec<&str> = many_vals.iter().map(String::as_str).collect();
        assert_eq!(
            error(&leaf_vals("a", "in", &refs)),
            "tags filter: more than 1024 vals"
        );
        assert!(Filter::compile(&leaf_vals("a", "in", &refs[..1024]), &limits).is_ok());
        // The vals bound is over the whole tree.
        let split = logical(
            "or",
            vec![
                leaf_vals("a", "in", &refs[..600]),
                leaf_vals("b", "nin", &refs[..600]),
            ],
        );
        assert_eq!(error(&split), "tags filter: more than 1024 vals");

        let wide = logical(
            "or",
            (0..200).map(|i| leaf("a", "eq", &i.to_string())).collect(),
        );
        assert_eq!(error(&wide), "tags filter: more than 128 nodes");
        let ok = logical(
            "or",
            (0..127).map(|i| leaf("a", "eq", &i.to_string())).collect(),
        );
        assert!(
            Filter::compile(&ok, &limits).is_ok(),
            "128 nodes with the root"
        );

        let big = "v".repeat(16_385);
        assert_eq!(
            error(&leaf("a", "eq", &big)),
            "tags filter: more than 16384 bytes of keys and values"
        );
        assert!(Filter::compile(&leaf("a", "eq", &big[..16_383]), &limits).is_ok());

        let tight = Limits {
            max_depth: 2,
            max_nodes: 3,
            max_vals: 2,
            max_bytes: 10,
        };
        assert!(Filter::compile(&logical("not", vec![leaf("a", "ex", "")]), &tight).is_ok());
        assert!(Filter::compile(&chain(3), &tight).is_err());
    }

    // ---- random trees against a naive evaluator ----

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
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    const KEYS: &[&str] = &["a", "b", "c", "d"];
    const STRINGS: &[&str] = &["x", "xy", "yx", "abc", "b", "1", "10"];
    const NUMBERS: &[&str] = &[
        "-3", "-1", "0", "1", "2", "9", "10", "11", "-0", "+2", "007",
    ];
    const TAG_VALUES: &[&str] = &[
        "", "x", "xy", "yx", "abc", "b", "-3", "-1", "0", "1", "2", "9", "10", "11", "-0", "+2",
        "007", "1.0", "abc1", "1e1", "--1",
    ];

    fn random_tree(rng: &mut Rng, depth: usize) -> FilterNode {
        if depth < 5 && rng.below(3) == 0 {
            return match rng.below(3) {
                0 => logical("not", vec![random_tree(rng, depth + 1)]),
                n => {
                    let kids = (0..1 + rng.below(3))
                        .map(|_| random_tree(rng, depth + 1))
                        .collect();
                    logical(if n == 1 { "and" } else { "or" }, kids)
                }
            };
        }
        let key = rng.pick(KEYS);
        let cmp = rng.pick(&[
            "eq", "neq", "in", "nin", "ex", "nex", "sw", "ew", "ct", "starts", "ends", "contains",
            "lt", "lte", "gt", "gte",
        ]);
        match cmp {
            "in" | "nin" => {
                let vals: Vec<&str> = (0..1 + rng.below(4))
                    .map(|_| {
                        if rng.below(6) == 0 {
                            ""
                        } else {
                            rng.pick(TAG_VALUES)
                        }
                    })
                    .collect();
                leaf_vals(key, cmp, &vals)
            }
            "ex" | "nex" => leaf(if rng.below(8) == 0 { "" } else { key }, cmp, ""),
            "lt" | "lte" | "gt" | "gte" => leaf(key, cmp, rng.pick(NUMBERS)),
            _ => leaf(key, cmp, rng.pick(STRINGS)),
        }
    }

    /// Plain f64 is exact for these short numbers.
    fn ref_number(s: &str) -> Option<f64> {
        if s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit() || b"+-.".contains(&b)) {
            return None;
        }
        s.parse().ok()
    }

    fn reference(n: &FilterNode, tags: Option<&BTreeMap<String, String>>) -> bool {
        match n.op.as_str() {
            "and" => n.nodes.iter().all(|c| reference(c, tags)),
            "or" => n.nodes.iter().any(|c| reference(c, tags)),
            "not" => !reference(&n.nodes[0], tags),
            _ => {
                let v = tags.and_then(|t| t.get(&n.key)).map(String::as_str);
                let numeric =
                    |want: fn(f64, f64) -> bool| match (v.and_then(ref_number), ref_number(&n.val))
                    {
                        (Some(a), Some(b)) => want(a, b),
                        _ => false,
                    };
                match n.cmp.as_str() {
                    "eq" => v == Some(n.val.as_str()),
                    "neq" => v != Some(n.val.as_str()),
                    "in" => n.vals.iter().any(|x| x == v.unwrap_or("")),
                    "nin" => !n.vals.iter().any(|x| x == v.unwrap_or("")),
                    "ex" => v.is_some(),
                    "nex" => v.is_none(),
                    "sw" | "starts" => v.is_some_and(|v| v.starts_with(&n.val)),
                    "ew" | "ends" => v.is_some_and(|v| v.ends_with(&n.val)),
                    "ct" | "contains" => v.is_some_and(|v| v.contains(&n.val)),
                    "lt" => numeric(|a, b| a < b),
                    "lte" => numeric(|a, b| a <= b),
                    "gt" => numeric(|a, b| a > b),
                    "gte" => numeric(|a, b| a >= b),
                    other => panic!("generator made cmp {other}"),
                }
            }
        }
    }

    #[test]
    fn random_trees_match_reference() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut matched, mut total) = (0, 0);
        for _ in 0..5000 {
            let tree = random_tree(&mut rng, 1);
            let filter = match Filter::compile(&tree, &Limits::default()) {
                Ok(f) => f,
                Err(e) => panic!("{e}: {tree:?}"),
            };
            let t: BTreeMap<String, String> = (0..rng.below(5))
                .map(|_| {
                    let k = if rng.below(10) == 0 {
                        ""
                    } else {
                        rng.pick(KEYS)
                    };
                    (k.to_string(), rng.pick(TAG_VALUES).to_string())
                })
                .collect();
            let t = if t.is_empty() && rng.below(2) == 0 {
                None
            } else {
                Some(&t)
            };
            let want = reference(&tree, t);
            assert_eq!(filter.matches(t), want, "tree {tree:?} tags {t:?}");
            matched += usize::from(want);
            total += 1;
        }
        // Both outcomes are well represented, so the comparison means something.
        assert!(
            matched > total / 5 && matched < total * 4 / 5,
            "{matched}/{total}"
        );
    }
}
