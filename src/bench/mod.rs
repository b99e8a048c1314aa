//! `kiln bench`: measures builds and the compression stages against the targets and
//! against the reference tools, and prints a table of medians and ratios with the machine
//! described.
//!
//! Everything runs on a copy of the project in a scratch directory: the one-file overlay edit
//! of the warm part never touches the user's repository, and cold builds use empty caches
//! there. Parts, one file each: `cold`, `warm`, `compress`, `pxe` (`kiln serve` on loopback with
//! HTTP and TFTP clients, against nginx and tftpd-hpa from `peers`; `cargo bench --bench pxe`
//! runs the same). This file holds what they
//! share: the machine, the rows and the report, timing, the table.

mod cold;
mod compress;
mod peers;
mod pxe;
mod warm;

use cold::cold;
use compress::compress;
pub use pxe::pxe;
use warm::warm;

use crate::pipeline::build::{self, BuildOptions};
use crate::pipeline::node;
use crate::pipeline::resolve::{self, Resolved};
use crate::project::recipe::{self, Project};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Targets from the benchmark issue.
pub const TARGET_WARM_SECONDS: f64 = 10.0;
pub const TARGET_COLD_RATIO: f64 = 1.5;
pub const TARGET_COMPRESS_RATIO: f64 = 0.9;

/// The machine the numbers were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub disk_free_gb: f64,
    pub disk_path: PathBuf,
    /// 1-minute load average when the bench started (other work skews the numbers).
    pub load_average: String,
    pub tools: BTreeMap<String, String>,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub part: String,
    pub what: String,
    /// Median of `runs` (wall-clock seconds), when timed.
    pub median_seconds: Option<f64>,
    pub runs: Vec<f64>,
    /// Median CPU seconds (user + system, kiln and the tools it ran): stable on a busy machine
    /// where wall time is not.
    pub median_cpu_seconds: Option<f64>,
    pub cpu_runs: Vec<f64>,
    /// Extra facts (sizes, per-stage medians).
    pub detail: String,
    pub target: Option<String>,
    /// The figure compared with the target (seconds or a ratio).
    pub ratio: Option<f64>,
    pub met: Option<bool>,
}

impl Row {
    fn timed(part: &str, what: impl Into<String>, runs: Vec<Timing>) -> Row {
        let wall: Vec<f64> = runs.iter().map(|t| t.wall).collect();
        let cpu: Vec<f64> = runs.iter().map(|t| t.cpu).collect();
        Row {
            part: part.into(),
            what: what.into(),
            median_seconds: median(&wall),
            runs: wall,
            median_cpu_seconds: median(&cpu),
            cpu_runs: cpu,
            detail: String::new(),
            target: None,
            ratio: None,
            met: None,
        }
    }
    fn note(part: &str, what: impl Into<String>, detail: impl Into<String>) -> Row {
        Row {
            part: part.into(),
            what: what.into(),
            median_seconds: None,
            runs: vec![],
            median_cpu_seconds: None,
            cpu_runs: vec![],
            detail: detail.into(),
            target: None,
            ratio: None,
            met: None,
        }
    }
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub schema: &'static str,
    pub machine: Machine,
    pub roles: Vec<String>,
    pub rows: Vec<Row>,
}

/// Wall-clock and CPU seconds of one measured run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub wall: f64,
    pub cpu: f64,
}

/// CPU seconds (user + system) used so far by this process and its waited-for children.
fn cpu_now() -> f64 {
    crate::sys::os::cpu_seconds_self_and_children()
}

/// Runs `f`, returning its result and how long it took (wall and CPU).
pub fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Timing)> {
    let (t, c) = (Instant::now(), cpu_now());
    let v = f()?;
    Ok((
        v,
        Timing {
            wall: round2(t.elapsed().as_secs_f64()),
            cpu: round2(cpu_now() - c),
        },
    ))
}

/// Median of a non-empty sample (mean of the middle two for even counts).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn first_line_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "not installed".into())
}

/// Describes this machine: CPU model, cores, RAM, kernel, free disk at `disk_path`, load.
pub fn describe_machine(disk_path: &Path) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| "unknown".into());
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let mut probe = disk_path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let mut tools = BTreeMap::new();
    tools.insert(
        "mmdebstrap".into(),
        first_line_of("mmdebstrap", &["--version"]),
    );
    tools.insert("tar2sqfs".into(), first_line_of("tar2sqfs", &["--version"]));
    tools.insert(
        "mksquashfs".into(),
        first_line_of("mksquashfs", &["-version"]),
    );
    tools.insert("zstd".into(), first_line_of("zstd", &["--version"]));
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: round1(mem_kib / 1024.0 / 1024.0),
        kernel,
        disk_free_gb: round1(crate::sys::os::free_bytes(&probe).unwrap_or(0) as f64 / 1e9),
        disk_path: probe,
        load_average: load,
        tools,
    }
}

/// A scratch copy of the project for one part.
fn copy_project(from: &Path, to: &Path) -> Result<Project> {
    crate::project::copy::copy_project(from, to)?;
    Ok(recipe::load_project(to)?)
}

/// Builds `roles` of `project` into `out` with `cache`; returns the reports and the timings of
/// the role builds (nodes excluded) and of the node outputs.
fn build_roles(
    project: &Project,
    roles: &[String],
    out: &Path,
    cache: &Path,
) -> Result<(Vec<build::BuildReport>, Timing, Timing, usize)> {
    let resolved: Vec<Resolved> = roles
        .iter()
        .map(|r| resolve::resolve(project, r))
        .collect::<Result<_>>()?;
    let planned = node::plan(project, &resolved)?;
    let opts = BuildOptions {
        out_dir: out.to_path_buf(),
        cache_dir: cache.to_path_buf(),
        force: false,
        offline: false,
        locked: false,
    };
    let (reports, roles_t) = measure(|| build::build_roles(project, &resolved, &opts, |_| {}))?;
    let (nodes, nodes_t) = measure(|| node::build_nodes(project, &planned, &reports, &opts))?;
    Ok((reports, roles_t, nodes_t, nodes.len()))
}

/// The role whose base alone is the cold reference: the worker's (shared with the master, no
/// DKMS) when it is among the roles, else the first.
fn reference_role(roles: &[String]) -> &str {
    roles
        .iter()
        .find(|r| r.as_str() == "worker")
        .unwrap_or(&roles[0])
}

/// Runs the requested parts and returns the report.
pub fn run_bench(
    project_dir: &Path,
    cache: &Path,
    work: &Path,
    roles: &[String],
    parts: &[String],
    runs: Option<usize>,
) -> Result<BenchReport> {
    let machine = describe_machine(work);
    let mut rows = Vec::new();
    let has = |p: &str| parts.iter().any(|x| x == p);
    if has("cold") {
        cold(project_dir, work, roles, runs.unwrap_or(1), &mut rows)?;
    }
    if has("warm") {
        warm(
            project_dir,
            work,
            cache,
            roles,
            runs.unwrap_or(3),
            &mut rows,
        )?;
    }
    if has("compress") {
        compress(
            project_dir,
            work,
            cache,
            &roles[0],
            runs.unwrap_or(3),
            &mut rows,
        )?;
    }
    if has("pxe") {
        let exe = std::env::current_exe().context("finding the kiln binary to run `kiln serve`")?;
        let scale = std::env::var("KILN_BENCH_PXE_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        pxe(
            project_dir,
            &exe,
            work,
            reference_role(roles),
            runs.unwrap_or(3),
            scale,
            &mut rows,
        )?;
    }
    Ok(BenchReport {
        schema: "kiln.bench/1",
        machine,
        roles: roles.to_vec(),
        rows,
    })
}

/// Seconds for the table: one decimal, three under a second (a TFTP transfer takes 0.1 s).
fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Prints the report as a table.
pub fn print_table(r: &BenchReport, o: &mut dyn Write) -> Result<()> {
    let m = &r.machine;
    writeln!(
        o,
        "machine: {}, {} cores, {} GiB RAM, {}, {} GB free at {}, load average {} at start",
        m.cpu,
        m.cores,
        m.memory_gib,
        m.kernel,
        m.disk_free_gb,
        m.disk_path.display(),
        m.load_average
    )?;
    writeln!(
        o,
        "tools: {}",
        m.tools
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ")
    )?;
    writeln!(
        o,
        "{:<9} {:<66} {:>9} {:>9} {:>5} {:>14} {:>7} {:>4}",
        "part", "measurement", "median", "cpu", "runs", "target", "value", "met"
    )?;
    for row in &r.rows {
        writeln!(
            o,
            "{:<9} {:<66} {:>9} {:>9} {:>5} {:>14} {:>7} {:>4}",
            row.part,
            row.what,
            row.median_seconds.map(secs).unwrap_or_default(),
            row.median_cpu_seconds
                .filter(|c| c.is_finite())
                .map(secs)
                .unwrap_or_default(),
            if row.runs.is_empty() {
                String::new()
            } else {
                row.runs.len().to_string()
            },
            row.target.clone().unwrap_or_default(),
            row.ratio.map(|x| format!("{x}")).unwrap_or_default(),
            match row.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        )?;
        if !row.detail.is_empty() {
            writeln!(o, "{:<9}   {}", "", row.detail)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn machine_is_described() {
        let m = describe_machine(Path::new("/nonexistent/dir"));
        assert!(m.cores >= 1);
        assert!(m.memory_gib > 0.0);
        assert!(m.kernel.starts_with("Linux "), "{}", m.kernel);
        assert_eq!(m.disk_path, PathBuf::from("/"));
    }

    #[test]
    fn table_marks_targets() {
        let t = |wall| Timing { wall, cpu: 1.0 };
        let mut r = Row::timed("warm", "worker", vec![t(12.0), t(9.0), t(11.0)]);
        r.target = Some("≤ 10 s".into());
        r.ratio = Some(11.0);
        r.met = Some(false);
        let rep = BenchReport {
            schema: "kiln.bench/1",
            machine: describe_machine(Path::new("/")),
            roles: vec!["worker".into()],
            rows: vec![r, Row::note("pxe", "HTTP", "not available yet")],
        };
        let mut buf = Vec::new();
        print_table(&rep, &mut buf).unwrap();
        let s = String::from_utf8(buf).unwrap();
        assert!(s.contains("11.0 s"), "{s}");
        assert!(s.contains(" NO"), "{s}");
        assert!(s.contains("not available yet"), "{s}");
    }
}
