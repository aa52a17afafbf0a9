//! Client requests counted per range for load-based splits: the ranges' request counters and
//! key samples that the API fills and the split checker reads.

/// Requests counted for one range in the current load window.
#[derive(Debug, Default)]
pub(crate) struct LoadStats {
    pub(crate) requests: u64,
    pub(crate) sample: Vec<Vec<u8>>,
}

const SAMPLE: usize = 64;

impl LoadStats {
    /// Counts a request on `key`, keeping a uniform sample of the keys (reservoir sampling).
    pub(crate) fn record(&mut self, key: &[u8]) {
        self.requests += 1;
        if self.sample.len() < SAMPLE {
            self.sample.push(key.to_vec());
        } else {
            let slot = rand::random::<u64>() % self.requests;
            if (slot as usize) < SAMPLE {
                self.sample[slot as usize] = key.to_vec();
            }
        }
    }
}
