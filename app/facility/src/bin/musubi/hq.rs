//! `musubi hq ...`: 災害対策本部 views over every shelter this facility is a member of.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use musubi_facility::services::hq;

use crate::{Data, Json, open_staff, print_json};

#[derive(Subcommand)]
pub(crate) enum HqCommand {
    /// Head counts per shelter and in total, and open supply requests.
    Summary {
        #[command(flatten)]
        data: Data,
        /// Counts as of this time (RFC 3339) from the stay events; default now.
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Counts per shelter over time.
    History {
        #[command(flatten)]
        data: Data,
        /// A time (RFC 3339) to count at; repeatable, or comma separated. Default: every event time.
        #[arg(long = "at", value_delimiter = ',')]
        at: Vec<String>,
        #[command(flatten)]
        json: Json,
    },
    /// 安否確認: where is a person? Answers only for evacuees who consented to disclosure.
    Inquiry {
        #[command(flatten)]
        data: Data,
        /// 氏名 or かな (spaces and full/half width are ignored).
        #[arg(long)]
        name: String,
        /// 問い合わせ者氏名: who asks (recorded in the audit log with the answer).
        #[arg(long)]
        inquirer: String,
        /// 続柄: their relationship to the person asked about.
        #[arg(long)]
        relationship: String,
        /// 連絡先: how to reach them.
        #[arg(long, default_value = "")]
        contact: String,
        #[command(flatten)]
        json: Json,
    },
    /// Export CSV: the roster of every shelter, or aggregates with HXL hashtags.
    Export {
        #[command(flatten)]
        data: Data,
        /// Every evacuee of every shelter (personal data: keep the file safe).
        #[arg(
            long,
            conflicts_with = "aggregate",
            required_unless_present = "aggregate"
        )]
        roster: bool,
        /// Counts per shelter with an HXL hashtag row.
        #[arg(long)]
        aggregate: bool,
        /// With --aggregate: counts as of this time (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        /// The CSV file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: HqCommand) -> Result<()> {
    match cmd {
        HqCommand::Summary { data, at, json } => {
            let e = open_staff(pf, &data.data)?;
            let s = hq::summary(&e, at.as_deref())?;
            if json.json {
                print_json(&s)?;
            } else {
                println!(
                    "避難者数 {} 人 (外泊 {}), 開設 {} 箇所, 時点 {}",
                    s.total_present, s.total_on_leave, s.open_shelters, s.as_of
                );
                for c in &s.shelters {
                    println!(
                        "{}  {:<24} {:>5} / {:<5} {}  要請 {}",
                        c.id,
                        c.name,
                        c.present,
                        c.capacity,
                        if c.status.as_str() == "open" {
                            "開設"
                        } else {
                            "閉鎖"
                        },
                        c.open_requests
                    );
                }
                for r in &s.open_requests {
                    println!(
                        "要請  {}  {} {}{}  [{}] {}",
                        r.shelter_name,
                        r.request.item,
                        r.request.quantity,
                        r.request.unit,
                        r.request.urgency.as_str(),
                        r.request.status.as_str()
                    );
                }
                if !s.unreadable.is_empty() {
                    println!(
                        "({} shelter(s) not readable yet: run `musubi sync --once`)",
                        s.unreadable.len()
                    );
                }
            }
        }
        HqCommand::History { data, at, json } => {
            let e = open_staff(pf, &data.data)?;
            let h = hq::history(&e, &at)?;
            if json.json {
                print_json(&h)?;
            } else {
                for (i, t) in h.times.iter().enumerate() {
                    println!("{t}  total {}", h.totals[i]);
                    for s in &h.shelters {
                        if s.counts[i] > 0 {
                            println!("    {:<24} {}", s.name, s.counts[i]);
                        }
                    }
                }
            }
        }
        HqCommand::Inquiry {
            data,
            name,
            inquirer,
            relationship,
            contact,
            json,
        } => {
            let e = open_staff(pf, &data.data)?;
            let inquirer = hq::Inquirer {
                name: inquirer,
                relationship,
                contact,
            };
            let answers = hq::inquiry(&e, &name, &inquirer)?;
            if json.json {
                print_json(&answers)?;
            } else if answers.is_empty() {
                println!("該当する情報はありません (no information can be given)");
            } else {
                for a in answers {
                    println!(
                        "{} ({})  {}  {:?}  {}",
                        a.name, a.kana, a.shelter_name, a.presence, a.since
                    );
                }
            }
        }
        HqCommand::Export {
            data,
            roster,
            aggregate,
            at,
            out,
        } => {
            let e = open_staff(pf, &data.data)?;
            let file = std::fs::File::create(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let rows = if roster {
                hq::export_roster(&e, file)?
            } else if aggregate {
                hq::export_aggregate(&e, at.as_deref(), file)?
            } else {
                bail!("give --roster or --aggregate");
            };
            eprintln!("wrote {rows} row(s) to {}", out.display());
        }
    }
    Ok(())
}
