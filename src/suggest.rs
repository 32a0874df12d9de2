//! "Did you mean …?" for names people type (presets, config keys).

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The candidate closest to `name`: one that contains it, or one within a few edits.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    if let Some(c) = candidates.iter().find(|c| !name.is_empty() && c.ends_with(name)) {
        return Some(c);
    }
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= (name.chars().count() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `" (did you mean X?)"`, or nothing.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    nearest(name, candidates).map(|c| format!(" (did you mean {c:?}?)")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_by_suffix_and_by_edits() {
        let presets = ["pspnet-r101", "pspnet-r18", "pspnet-r18-paper"];
        assert_eq!(nearest("r18", presets), Some("pspnet-r18"));
        assert_eq!(nearest("pspnet-r19", presets), Some("pspnet-r18"));
        assert_eq!(nearest("resnet", presets), None);
        assert_eq!(edit_distance("wieght", "weight"), 2);
    }
}
