//! The benchmark never rots: every scenario runs at toy sizes and reports
//! numbers. Speed itself is never asserted here.

use quotebridge::bench::{self, Options, Scenario};
use quotebridge::topology::Role;

/// Every scenario at toy sizes, the bridge as a child process.
fn tiny() -> Options {
    Options {
        quotes: 2_000,
        symbols: 10,
        rates: vec![500],
        latency_sockets: 3,
        seconds: 0.5,
        fanout_sockets: vec![5],
        groups: 2,
        fanout_frames: 2_000,
        resume_sockets: 4,
        resume_missed: 40,
        resume_symbols: 4,
        idle_sockets: 20,
        micro_quotes: 1_000,
        bridge_binary: Some(env!("CARGO_BIN_EXE_quotebridge").into()),
        ..Options::default()
    }
}

/// The report's first row of `scenario`.
fn first_row(report: &bench::Report, scenario: Scenario) -> &bench::Row {
    report
        .rows
        .iter()
        .find(|r| r.scenario == scenario)
        .unwrap_or_else(|| panic!("no {scenario:?} row in\n{}", report.table()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports() {
    let options = tiny();
    let report = bench::run(&options).await.expect("bench runs");
    let table = report.table();
    for (scenario, metric) in [
        (Scenario::Micro, "ns_per_quote"),
        (Scenario::Series, "ns_per_quote"),
        (Scenario::Ingest, "bridge_quotes_per_s"),
        (Scenario::Ingest, "ceiling_msgs_per_s"),
        (Scenario::Latency, "socket_p99_us"),
        (Scenario::Fanout, "frames_per_s"),
        (Scenario::SlowFanout, "frames_per_s"),
        (Scenario::Resume, "replayed_frames_per_s"),
        (Scenario::Connections, "rss_after_kib"),
    ] {
        let row = first_row(&report, scenario);
        let value = row
            .get(metric)
            .unwrap_or_else(|| panic!("no {metric} in\n{table}"));
        assert!(value > 0.0, "{metric} is {value} in\n{table}");
        assert!(
            row.note
                .as_deref()
                .is_none_or(|n| !n.contains("incomplete")),
            "{table}"
        );
    }
    let kinds = report
        .rows
        .iter()
        .filter(|r| r.scenario == Scenario::Series)
        .count();
    assert_eq!(
        kinds,
        8 + 1,
        "one row per indicator kind, and the pipeline with them all, in\n{table}"
    );
    let with_series = report
        .rows
        .iter()
        .find(|r| r.scenario == Scenario::Ingest && r.parameters.ends_with("example series"))
        .unwrap_or_else(|| panic!("no ingest row with the example series in\n{table}"));
    assert!(
        with_series.get("bridge_quotes_per_s") > Some(0.0),
        "{table}"
    );
    let latency = first_row(&report, Scenario::Latency);
    assert_eq!(
        latency.get("frames"),
        Some(250.0 * 3.0),
        "every frame reached every socket"
    );
    let fanout = first_row(&report, Scenario::Fanout);
    assert_eq!(
        fanout.get("frames"),
        Some(2_000.0),
        "two timed rounds of 200 results to 5 sockets, the warm-up round not counted"
    );
    assert!(fanout.get("warm_up_ms").is_some(), "{table}");
    let json = serde_json::to_value(&report).expect("report serializes");
    // One row per scenario, the series' nine, and ingest's second.
    assert!(
        json["rows"]
            .as_array()
            .is_some_and(|rows| rows.len() == 7 + 8 + 1 + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_and_gateway_roles_are_measured_on_their_own() {
    let tiny = Options {
        scenarios: vec![Scenario::Ingest, Scenario::Latency, Scenario::Fanout],
        ..tiny()
    };
    let compute = bench::run(&Options {
        role: Role::Compute,
        ..tiny.clone()
    })
    .await
    .expect("bench runs");
    let gateway = bench::run(&Options {
        role: Role::Gateway,
        ..tiny
    })
    .await
    .expect("bench runs");
    assert!(first_row(&compute, Scenario::Ingest).get("bridge_quotes_per_s") > Some(0.0));
    assert!(first_row(&gateway, Scenario::Fanout).get("frames_per_s") > Some(0.0));
    assert_eq!(
        first_row(&gateway, Scenario::Latency).get("frames"),
        Some(250.0 * 3.0),
        "a gateway relays every result to every socket"
    );
    for (report, scenario) in [
        (&compute, Scenario::Fanout),
        (&compute, Scenario::Latency),
        (&gateway, Scenario::Ingest),
    ] {
        let row = first_row(report, scenario);
        assert!(
            row.note
                .as_deref()
                .is_some_and(|n| n.starts_with("not applicable")),
            "{}",
            report.table()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_abuse_scenario_measures_a_quiet_phase_and_every_abuse() {
    let options = Options {
        scenarios: vec![Scenario::Abuse],
        seconds: 0.3,
        ..tiny()
    };
    let report = bench::run(&options).await.expect("bench runs");
    let table = report.table();
    assert_eq!(
        report.rows.len(),
        7,
        "quiet, five abuses and the noise:\n{table}"
    );
    let (noise, phases) = report.rows.split_last().expect("rows");
    for row in phases {
        assert!(row.get("p99_us").is_some_and(|p99| p99 > 0.0), "{table}");
    }
    let compared = phases
        .iter()
        .filter(|r| r.get("p99_vs_quiet").is_some() && r.get("p50_vs_quiet").is_some());
    assert_eq!(compared.count(), 5, "{table}");
    assert!(
        noise
            .get("largest_quiet_swing")
            .is_some_and(|swing| swing >= 1.0),
        "{table}"
    );
    assert!(
        noise.get("quiet_p99_min_us") <= noise.get("quiet_p99_max_us"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soak_scenario_samples_the_bridge_s_memory() {
    let options = Options {
        scenarios: vec![Scenario::Soak],
        soak_seconds: 1.0,
        ..tiny()
    };
    let report = bench::run(&options).await.expect("bench runs");
    let table = report.table();
    let row = report.rows.first().expect("a soak row");
    assert!(
        row.get("rss_end_kib").is_some_and(|kib| kib > 0.0),
        "{table}"
    );
    assert!(row.get("kib_per_minute").is_some(), "{table}");
}
