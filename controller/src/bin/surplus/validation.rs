//! `surplus validate|validations`: validation runs (benchmarks, security checks).

use clap::Subcommand;
use surplus_api::RunStatus;
use surplus_api::validation::{Cancelling, RunHistory, RunView, ValidationOptions};

use crate::client::{Client, now_ms, print, table, when};

#[derive(Subcommand)]
pub enum Command {
    /// Run validation tests (benchmarks, security checks) on an agent and show the result.
    Validate {
        /// Agent id.
        agent: String,
        /// Run the benchmark suite (default: both, when neither is named).
        #[arg(long)]
        bench: bool,
        /// Run the security checks.
        #[arg(long)]
        security: bool,
        /// Small benchmark sizes: a smoke test, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Benchmark time budget.
        #[arg(long, default_value = "60s")]
        budget: String,
        /// Timed repetitions of each measurement.
        #[arg(long, default_value_t = 5)]
        repetitions: u32,
        /// Order the run and print its id without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Validation runs.
    Validations {
        #[command(subcommand)]
        command: ValidationsCommand,
    },
}

#[derive(Subcommand)]
pub enum ValidationsCommand {
    /// Runs of an agent, newest first.
    List {
        /// Agent id.
        agent: String,
    },
    /// One run with its results.
    Show {
        /// Run id.
        run: String,
    },
    /// Stop a running run.
    Cancel {
        /// Run id.
        run: String,
    },
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Validate {
            agent,
            bench,
            security,
            quick,
            budget,
            repetitions,
            no_wait,
        } => {
            let (bench, security) = if bench || security {
                (bench, security)
            } else {
                (true, true)
            };
            let options = ValidationOptions {
                bench,
                security,
                quick,
                budget,
                repetitions,
                ..ValidationOptions::default()
            };
            let run: RunView = client
                .post(&format!("/v1/agents/{agent}/validation"), &options)
                .await?;
            if no_wait {
                print(json, &run, || {
                    println!("validation run {} ordered", run.run.id)
                });
                return Ok(());
            }
            let run = wait_for_run(client, run.run.id, json).await?;
            print(json, &run, || show_run(&run));
        }
        Command::Validations {
            command: ValidationsCommand::List { agent },
        } => {
            let runs: RunHistory = client
                .get(&format!("/v1/agents/{agent}/validation"))
                .await?;
            print(json, &runs.history, || history_table(&runs.history));
        }
        Command::Validations {
            command: ValidationsCommand::Show { run },
        } => {
            let run: RunView = client.get(&format!("/v1/validations/{run}")).await?;
            print(json, &run, || show_run(&run));
        }
        Command::Validations {
            command: ValidationsCommand::Cancel { run },
        } => {
            let answer: Cancelling = client
                .post_empty(&format!("/v1/validations/{run}/cancel"))
                .await?;
            print(json, &answer, || {
                println!("validation run {run}: cancellation sent")
            });
        }
    }
    Ok(())
}

fn history_table(history: &[RunView]) {
    let mut t = table(&[
        "RUN",
        "STATUS",
        "ORDERED",
        "COMPOSITE",
        "HARDENING",
        "ERROR",
    ]);
    let now = now_ms();
    for r in history {
        t.add_row([
            r.run.id.to_string(),
            r.run.status.as_str().to_owned(),
            when(Some(r.run.requested_at_ms), now),
            r.run
                .bench
                .as_ref()
                .and_then(|b| b["composite_score"].as_f64())
                .map_or("-".into(), |c| format!("{c:.2}")),
            r.run
                .security
                .as_ref()
                .and_then(|s| s["hardening_index"].as_u64())
                .map_or("-".into(), |h| h.to_string()),
            r.run.error.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

/// Follows a run with a progress bar until it ends; Ctrl-C cancels the run.
async fn wait_for_run(client: &Client, run_id: uuid::Uuid, quiet: bool) -> anyhow::Result<RunView> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(1)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({elapsed})")
            .expect("static template"),
    );
    let mut cancelled = false;
    loop {
        let run: RunView = client.get(&format!("/v1/validations/{run_id}")).await?;
        if run.run.status != RunStatus::Running {
            bar.finish_and_clear();
            return Ok(run);
        }
        if let Some(p) = &run.progress {
            bar.set_length(u64::from(p.total.max(1)));
            bar.set_position(u64::from(p.done));
            bar.set_message(p.step.clone());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                bar.set_message("cancelling");
                let _: Cancelling = client.post_empty(&format!("/v1/validations/{run_id}/cancel")).await?;
            }
        }
    }
}

fn show_run(run: &RunView) {
    let r = &run.run;
    println!(
        "validation run {} on agent {}: {}",
        r.id,
        r.agent_id,
        r.status.as_str()
    );
    if let Some(e) = &r.error {
        println!("error: {e}");
    }
    if let Some(b) = &r.bench {
        println!(
            "{:<20} {:>14} {:<8} {:>7} {:>7}",
            "benchmark", "value", "unit", "cv", "score"
        );
        for x in b["results"].as_array().into_iter().flatten() {
            let score = x["score"]
                .as_f64()
                .filter(|s| *s > 0.0)
                .map_or("-".into(), |s| format!("{s:.2}"));
            println!(
                "{:<20} {:>14.1} {:<8} {:>6.1}% {:>7}",
                x["id"].as_str().unwrap_or("?"),
                x["value"].as_f64().unwrap_or(0.0),
                x["unit"].as_str().unwrap_or(""),
                x["cv"].as_f64().unwrap_or(0.0) * 100.0,
                score
            );
        }
        for s in b["skipped"].as_array().into_iter().flatten() {
            println!("skipped: {}", s.as_str().unwrap_or(""));
        }
        println!(
            "composite score {:.2}",
            b["composite_score"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(s) = &r.security {
        for f in s["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["status"] == "fail")
        {
            println!(
                "FAIL {:<9} {:<30} {}",
                f["severity"].as_str().unwrap_or(""),
                f["id"].as_str().unwrap_or(""),
                f["evidence"].as_str().unwrap_or("")
            );
        }
        println!(
            "hardening index {} / 100 ({})",
            s["hardening_index"].as_u64().unwrap_or(0),
            s["band"].as_str().unwrap_or("")
        );
    }
}
