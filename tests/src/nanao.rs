//! The real evacuee counts of 七尾市 after the 2024 Noto earthquake (`../shared/data/shelters/
//! nanao-noto-2024/history`, CC BY 4.0: 石川県, 七尾市, compiled by raokiey), turned into a replay
//! plan: at each snapshot time, the check-ins and check-outs that take every shelter from the
//! previous snapshot's count to this one's.
//!
//! A shelter missing from a snapshot has 0 people then. The people are synthetic (a name and birth
//! date unique per shelter and number); check-outs take the longest-staying first.

use std::collections::BTreeMap;
use std::fs;

use crate::shared_data;

/// The data set's folder under `../shared/data`.
pub const DATA_DIR: &str = "shelters/nanao-noto-2024/history";

/// One shelter row of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// `ID` (registry id such as `CC0000000504`, or `NEW001` for places outside the registry).
    pub code: String,
    /// `地区`.
    pub district: String,
    /// `名称`.
    pub name: String,
    /// `所在地_連結表記`.
    pub address: String,
    /// The indoor capacity of `想定収容人数` (`屋内480人／...` → 480), 0 when not stated.
    pub capacity: u64,
    /// `人数`: evacuees at the snapshot time.
    pub count: usize,
}

/// One snapshot file.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The snapshot time, RFC 3339 in JST (from the file name `..._2024-01-09-1800.csv`).
    pub time: String,
    /// Rows by code.
    pub rows: BTreeMap<String, Row>,
}

impl Snapshot {
    /// The count of a shelter at this snapshot (0 when absent).
    pub fn count(&self, code: &str) -> usize {
        self.rows.get(code).map_or(0, |r| r.count)
    }

    /// The total of all shelters.
    pub fn total(&self) -> usize {
        self.rows.values().map(|r| r.count).sum()
    }
}

/// Parses CSV text (RFC 4180: quoted fields, doubled quotes, CRLF or LF).
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.trim_start_matches('\u{feff}').chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

fn capacity(text: &str) -> u64 {
    let Some(rest) = text.split("屋内").nth(1) else {
        return 0;
    };
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(|c| *c != ',')
        .collect();
    digits.parse().unwrap_or(0)
}

/// Every snapshot of the history folder, in time order. Panics when the data is missing or malformed.
pub fn snapshots() -> Vec<Snapshot> {
    let dir = shared_data(DATA_DIR);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no snapshot CSV in {}", dir.display());
    files
        .iter()
        .map(|path| {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("utf-8 file name");
            // open_shelter_Nanao-shi_2024-01-09-1800
            let stamp = stem
                .rsplit('_')
                .next()
                .expect("a time stamp in the file name");
            let p: Vec<&str> = stamp.split('-').collect();
            assert_eq!(p.len(), 4, "file name {stem} ends in YYYY-MM-DD-HHMM");
            let time = format!(
                "{}-{}-{}T{}:{}:00+09:00",
                p[0],
                p[1],
                p[2],
                &p[3][..2],
                &p[3][2..]
            );
            let text =
                fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let table = parse_csv(&text);
            let header = &table[0];
            let col = |pred: &dyn Fn(&str) -> bool| {
                header
                    .iter()
                    .position(|h| pred(h))
                    .unwrap_or_else(|| panic!("{stem}: no such column in {header:?}"))
            };
            let (id, district, name, count) = (
                col(&|h| h == "ID"),
                col(&|h| h == "地区"),
                col(&|h| h == "名称"),
                col(&|h| h.starts_with("人数")),
            );
            let address = col(&|h| h == "所在地_連結表記");
            let cap = col(&|h| h == "想定収容人数");
            let mut rows = BTreeMap::new();
            for r in &table[1..] {
                if r.len() < header.len() {
                    continue;
                }
                let count: usize = r[count]
                    .replace(',', "")
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{stem}: bad count {:?}", r[count]));
                let row = Row {
                    code: r[id].clone(),
                    district: r[district].clone(),
                    name: r[name].clone(),
                    address: r[address].clone(),
                    capacity: capacity(&r[cap]),
                    count,
                };
                assert!(
                    rows.insert(row.code.clone(), row).is_none(),
                    "{stem}: shelter listed twice"
                );
            }
            Snapshot { time, rows }
        })
        .collect()
}

/// A synthetic evacuee of the replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Person {
    /// 氏名, unique in the replay.
    pub name: String,
    /// 生年月日.
    pub birth: String,
}

/// What happens at one shelter at one snapshot.
#[derive(Clone, Debug, Default)]
pub struct Step {
    /// People who arrive.
    pub check_ins: Vec<Person>,
    /// People who leave (checked in earlier at this shelter).
    pub check_outs: Vec<Person>,
}

/// The replay: per snapshot, per shelter code, the step that reaches the snapshot's count.
pub fn plan(snapshots: &[Snapshot]) -> Vec<BTreeMap<String, Step>> {
    let mut present: BTreeMap<String, std::collections::VecDeque<Person>> = BTreeMap::new();
    let mut serial: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for snap in snapshots {
        let mut steps = BTreeMap::new();
        let codes: Vec<String> = present.keys().chain(snap.rows.keys()).cloned().collect();
        for code in codes {
            if steps.contains_key(&code) {
                continue;
            }
            let here = present.entry(code.clone()).or_default();
            let want = snap.count(&code);
            let mut step = Step::default();
            while here.len() > want {
                step.check_outs.push(here.pop_front().expect("non-empty"));
            }
            while here.len() < want {
                let n = serial.entry(code.clone()).or_default();
                *n += 1;
                let p = Person {
                    name: format!("七尾 {code}-{:05}", *n),
                    birth: format!("{}-{:02}-{:02}", 1930 + *n % 80, 1 + *n % 12, 1 + *n % 28),
                };
                here.push_back(p.clone());
                step.check_ins.push(p);
            }
            if !step.check_ins.is_empty() || !step.check_outs.is_empty() {
                steps.insert(code, step);
            }
        }
        out.push(steps);
    }
    out
}

/// Every shelter that appears in any snapshot (its first row), by code.
pub fn shelters(snapshots: &[Snapshot]) -> BTreeMap<String, Row> {
    let mut out = BTreeMap::new();
    for s in snapshots {
        for (code, row) in &s.rows {
            out.entry(code.clone()).or_insert_with(|| row.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_capacities_parse() {
        let t = parse_csv("a,b\n\"x, y\",\"say \"\"hi\"\"\"\r\n");
        assert_eq!(t, vec![vec!["a", "b"], vec!["x, y", "say \"hi\""]]);
        assert_eq!(capacity("屋内480人／屋外3,350人(面積の1/2)"), 480);
        assert_eq!(capacity("屋内1,700人／屋外2,250人"), 1700);
        assert_eq!(capacity(""), 0);
    }

    #[test]
    fn the_plan_reaches_every_snapshot_count() {
        let snaps = snapshots();
        assert_eq!(snaps.len(), 117, "the history folder has 117 snapshots");
        assert_eq!(snaps[0].total(), 1886);
        let plan = plan(&snaps);
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for (snap, steps) in snaps.iter().zip(&plan) {
            for (code, step) in steps {
                let c = count.entry(code.clone()).or_default();
                *c = *c + step.check_ins.len() - step.check_outs.len();
            }
            for (code, c) in &count {
                assert_eq!(*c, snap.count(code), "{code} at {}", snap.time);
            }
        }
    }
}
