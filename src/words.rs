//! Counted nouns for messages people read: "1 bucket", "3 buckets".

/// `n` and `noun`, the noun in the plural (an added "s") unless `n` is 1.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn singular_only_for_one() {
        assert_eq!(super::count(1u32, "bucket"), "1 bucket");
        assert_eq!(super::count(0u32, "bucket"), "0 buckets");
        assert_eq!(super::count(12u64, "image"), "12 images");
    }
}
