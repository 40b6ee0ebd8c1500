//! Choosing an instance: power of two choices over in-flight requests. Two
//! instances are picked at random and the one with fewer active connections
//! wins, which spreads load almost as well as least-connections without
//! herding on one instance. Pure: the caller supplies the random numbers and
//! the in-flight counts.

/// Picks an index into `loads` (in-flight connections per candidate) from
/// two random draws `r1`, `r2`. None when there is no candidate.
pub fn p2c(loads: &[u64], r1: usize, r2: usize) -> Option<usize> {
    match loads.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = r1 % n;
            let mut b = r2 % (n - 1);
            if b >= a {
                b += 1;
            }
            Some(if loads[b] < loads[a] { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_candidates_no_choice() {
        assert_eq!(p2c(&[], 1, 2), None);
        assert_eq!(p2c(&[7], 1, 2), Some(0));
    }

    #[test]
    fn the_less_loaded_of_the_two_wins() {
        assert_eq!(p2c(&[5, 1], 0, 0), Some(1));
        assert_eq!(p2c(&[1, 5], 0, 0), Some(0));
    }

    #[test]
    fn two_draws_never_pick_the_same_candidate_twice() {
        for r1 in 0..10 {
            for r2 in 0..10 {
                let loads = [0, 0, 0];
                let a = r1 % 3;
                let mut b = r2 % 2;
                if b >= a {
                    b += 1;
                }
                assert_ne!(a, b);
                assert!(p2c(&loads, r1, r2).is_some());
            }
        }
    }

    #[test]
    fn load_spreads_over_all_instances() {
        let mut loads = [0u64; 4];
        let mut seed = 12345usize;
        for _ in 0..400 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = p2c(&loads, seed >> 7, seed >> 23).unwrap();
            loads[i] += 1;
        }
        assert!(loads.iter().all(|l| *l >= 90), "{loads:?}");
    }
}
