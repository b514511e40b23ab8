//! A live session that acts in rounds when a test tells it to: the test writes `go-N`, the
//! session runs the round's shell and leaves its output in `result-N`. For checks that a rule
//! changes under a session that keeps running (expiry, reload, a daemon that went away).

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::unique_tag;

pub struct Rounds {
    dir: PathBuf,
    next: Cell<u32>,
}

impl Rounds {
    /// Rounds kept in a new directory under `parent` (which sessions can reach).
    pub fn new(parent: &Path) -> Rounds {
        let dir = parent.join(format!("rounds-{}", unique_tag()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Rounds { dir, next: Cell::new(0) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Shell for the session: `count` rounds, each waiting (at most 30 s) for its go, then running
    /// `body`, whose standard output is the round's result.
    pub fn script(&self, count: u32, body: &str) -> String {
        let dir = self.dir.display();
        format!(
            r#"round=1
while [ $round -le {count} ]; do
  i=0; while [ ! -e {dir}/go-$round ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
  {{ {body}
  }} > {dir}/result-$round.tmp; mv {dir}/result-$round.tmp {dir}/result-$round
  round=$((round + 1))
done"#
        )
    }

    /// Lets the session run its next round and returns what it printed (trimmed).
    pub fn next(&self) -> String {
        let round = self.next.get() + 1;
        self.next.set(round);
        fs::write(self.dir.join(format!("go-{round}")), "").expect("writing go");
        let result = self.dir.join(format!("result-{round}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !result.exists() {
            assert!(Instant::now() < deadline, "the session did not report round {round}");
            thread::sleep(Duration::from_millis(20));
        }
        fs::read_to_string(result).expect("reading the result").trim().to_owned()
    }
}
