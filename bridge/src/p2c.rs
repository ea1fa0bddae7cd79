//! Power of two choices, the one picker both load-balancing decisions use: tunnel links
//! (`tunnel::peers`) and upstream endpoints (`upstream::balancer`). Two candidates drawn
//! at random, the less loaded wins: nearly as even as least-loaded, without a scan or a
//! herd on one idle target (Mitzenmacher; Envoy's and linkerd's default).

use rand::Rng;

/// Two distinct uniformly random indices below `len` (which must be at least 2).
pub(crate) fn two_distinct(len: usize) -> (usize, usize) {
    let mut rng = rand::rng();
    let first = rng.random_range(0..len);
    let mut second = rng.random_range(0..len - 1);
    if second >= first {
        second += 1;
    }
    (first, second)
}

/// Of `a` and `b`, the one with the lower `load`; `a` on a tie.
pub(crate) fn less_loaded<T>(a: T, b: T, load: impl Fn(&T) -> usize) -> T {
    if load(&b) < load(&a) { b } else { a }
}

/// Picks among `len` candidates, reached by index through `nth`, without collecting them.
pub(crate) fn pick<T>(
    len: usize,
    nth: impl Fn(usize) -> T,
    load: impl Fn(&T) -> usize,
) -> Option<T> {
    match len {
        0 => None,
        1 => Some(nth(0)),
        _ => {
            let (a, b) = two_distinct(len);
            Some(less_loaded(nth(a), nth(b), load))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn draws_two_different_candidates_and_keeps_the_less_loaded() {
        for len in 2..6 {
            for _ in 0..200 {
                let (a, b) = two_distinct(len);
                assert!(a < len && b < len && a != b);
            }
        }
        assert_eq!(pick(0, |i| i, |_| 0), None);
        assert_eq!(pick(1, |i| i, |_| 0), Some(0));
        // Candidate 0 carries no load: whenever it is drawn it wins, so it wins most.
        let wins = (0..3000)
            .filter(|_| pick(3, |i| i, |&i| if i == 0 { 0 } else { 5 }) == Some(0))
            .count();
        assert!(wins > 1500, "{wins}");
    }
}
