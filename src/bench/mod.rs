//! `kiln bench`: measures builds and the compression stages against the issue's targets and
//! against the reference tools, and prints a table of medians and ratios with the machine
//! described.
//!
//! Everything runs on a copy of the project in a scratch directory: the one-file overlay edit
//! of the warm part never touches the user's repository, and cold builds use empty caches
//! there. Parts: `cold`, `warm`, `compress`, `pxe` (`kiln serve` on loopback with HTTP and TFTP
//! clients; `cargo bench --bench pxe` runs the same).

use crate::pipeline::build::{self, BuildOptions};
use crate::pipeline::compose::{self, ComposeInput};
use crate::project::layout::{key, Cache, Layout, Out};
use crate::project::recipe::{self, Project};
use crate::pipeline::resolve::{self, Resolved};
use crate::sys::tools;
use crate::pipeline::emit;
use crate::pipeline::node;
use crate::sys::util;
use anyhow::{bail, Context, Result};
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
    crate::pipeline::reproduce::copy_project(from, to)?;
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

fn stage_medians(all: &[Vec<(String, f64)>]) -> String {
    let mut by: BTreeMap<usize, (String, Vec<f64>)> = BTreeMap::new();
    for run in all {
        for (i, (name, s)) in run.iter().enumerate() {
            by.entry(i)
                .or_insert_with(|| (name.clone(), vec![]))
                .1
                .push(*s);
        }
    }
    by.values()
        .map(|(n, v)| format!("{n} {:.1}", median(v).unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The role whose base alone is the cold reference: the worker's (shared with the master, no
/// DKMS) when it is among the roles, else the first.
fn reference_role(roles: &[String]) -> &str {
    roles
        .iter()
        .find(|r| r.as_str() == "worker")
        .unwrap_or(&roles[0])
}

/// The references of the cold part, each a base built alone: the shared one (see
/// [`reference_role`]) and, when a role's base compiles modules with DKMS (gpu) and is another
/// base, that one too — the longest base is the critical path no build of these roles can beat.
fn cold_references(project: &Project, roles: &[String]) -> Result<Vec<(String, Resolved)>> {
    let shared = reference_role(roles);
    let mut refs = vec![(shared.to_string(), resolve::resolve(project, shared)?)];
    for role in roles {
        let r = resolve::resolve(project, role)?;
        if r.base.module_signing_cert.is_some() && r.base_key != refs[0].1.base_key {
            refs.push((role.clone(), r));
            break;
        }
    }
    Ok(refs)
}

fn cold(
    project_dir: &Path,
    work: &Path,
    roles: &[String],
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let project = copy_project(project_dir, &work.join("cold-project"))?;
    let refs = cold_references(&project, roles)?;
    let mut base_s: Vec<Vec<Timing>> = refs.iter().map(|_| vec![]).collect();
    let mut total_s = vec![];
    let mut bases = 0;
    for i in 0..runs {
        // Each reference base alone, from an empty cache.
        for (j, (_, r)) in refs.iter().enumerate() {
            let cache = work.join(format!("cold-one-cache-{i}-{j}"));
            let (_, t) = measure(|| crate::pipeline::build::base_of(&project, r, &cache, false))?;
            base_s[j].push(t);
            fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
        }

        // Every role, from another empty cache.
        let cache = work.join(format!("cold-cache-{i}"));
        let out = work.join(format!("cold-out-{i}"));
        let (_, roles_s, _, _) = build_roles(&project, roles, &out, &cache)?;
        bases = {
            fs::read_dir(Cache::new(&cache).bases())
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0)
        };
        total_s.push(roles_s);
        for d in [&cache, &out] {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    let mut base_median = vec![];
    for ((role, r), ts) in refs.iter().zip(base_s) {
        base_median.push(median(&ts.iter().map(|t| t.wall).collect::<Vec<_>>()).unwrap_or(0.0));
        let dkms = if r.base.module_signing_cert.is_some() {
            ", DKMS"
        } else {
            ""
        };
        rows.push(Row::timed(
            "cold",
            format!("one base build alone (mmdebstrap, role {role}{dkms}), empty cache"),
            ts,
        ));
    }
    let mut r = Row::timed(
        "cold",
        format!("roles {} from an empty cache", roles.join("+")),
        total_s,
    );
    let t = r.median_seconds.unwrap_or(0.0);
    r.detail = format!(
        "{bases} distinct base(s) built side by side in the background; each role composed once its base was ready"
    );
    let ratio_row = |r: &mut Row, b: f64| {
        r.target = Some(format!("≤ {TARGET_COLD_RATIO}× one base"));
        if b > 0.0 {
            r.ratio = Some(round2(t / b));
            r.met = Some(t / b <= TARGET_COLD_RATIO);
        }
    };
    ratio_row(&mut r, base_median[0]);
    rows.push(r);
    if let (Some((role, _)), Some(&b)) = (refs.get(1), base_median.get(1)) {
        let mut r = Row::note(
            "cold",
            format!("the same against the longest base alone (role {role}: the critical path)"),
            "",
        );
        ratio_row(&mut r, b);
        rows.push(r);
    }
    Ok(())
}

fn warm(
    project_dir: &Path,
    work: &Path,
    cache: &Path,
    roles: &[String],
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let pdir = work.join("warm-project");
    let project = copy_project(project_dir, &pdir)?;
    let out = work.join("warm-out");
    for role in roles {
        let one = [role.clone()];
        // Untimed: make sure the base is cached and the role built once.
        let (first, ..) = build_roles(&project, &one, &out, cache)?;
        let mut prev = Some(first[0].dir.clone());
        let (mut role_s, mut node_s, mut stages) = (vec![], vec![], vec![]);
        let mut n_nodes = 0;
        let edit = Layout::new(&pdir)
            .overlays()
            .join(role)
            .join("etc/kiln-bench-edit");
        for i in 0..runs {
            fs::create_dir_all(edit.parent().expect("has parent"))?;
            fs::write(
                &edit,
                format!("kiln bench edit {i} {}\n", std::process::id()),
            )
            .with_context(|| format!("writing {}", edit.display()))?;
            let project = recipe::load_project(&pdir)?;
            let (reports, rs, ns, nn) = build_roles(&project, &one, &out, cache)?;
            role_s.push(rs);
            node_s.push(ns);
            n_nodes = nn;
            stages.push(reports[0].timings.clone());
            // Keep the scratch out dir small: drop the build before this one. The latest stays,
            // as on a user's machine: the next build copies its unchanged compressed blocks.
            if let Some(p) = prev.replace(reports[0].dir.clone()) {
                fs::remove_dir_all(p).ok();
            }
        }
        if let Some(p) = prev {
            fs::remove_dir_all(p).ok();
        }
        fs::remove_file(&edit).ok();
        let mut r = Row::timed(
            "warm",
            format!("{role}: rebuild after a one-file overlay edit"),
            role_s,
        );
        r.detail = format!("stages (median s): {}", stage_medians(&stages));
        r.target = Some(format!("≤ {TARGET_WARM_SECONDS} s"));
        let m = r.median_seconds.unwrap_or(f64::MAX);
        r.ratio = Some(round1(m));
        r.met = Some(m <= TARGET_WARM_SECONDS);
        rows.push(r);
        let mut r = Row::timed(
            "warm",
            format!("{role}: node outputs ({n_nodes} nodes)"),
            node_s,
        );
        r.detail = "seeds, CIDATA FAT + ISO, node disk.raw + disk.qcow2, sums, signature".into();
        rows.push(r);
    }
    Ok(())
}

fn time_it(f: impl FnOnce() -> Result<()>) -> Result<Timing> {
    Ok(measure(f)?.1)
}

fn run_tool(cmd: &mut Command) -> Result<()> {
    tools::run(cmd).map(|_| ())
}

fn compress(
    project_dir: &Path,
    work: &Path,
    cache: &Path,
    role: &str,
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let project = copy_project(project_dir, &work.join("compress-project"))?;
    let r = resolve::resolve(&project, role)?;
    let sde = project.cluster.section.source_date_epoch;
    let base = crate::pipeline::build::base_of(&project, &r, cache, false)?;
    let dir = work.join("compress");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tar = dir.join("rootfs.tar");
    // The role's tree without the k3s layer (no artifacts or token needed).
    compose::compose(
        &ComposeInput {
            project: &project,
            recipe: &r.recipe,
            build_id: &r.build_id,
            overlays: &r.overlays,
            base_tar: &base.tar,
            extra: BTreeMap::new(),
            extra_enable: vec![],
        },
        &tar,
    )?;
    let tar_size = fs::metadata(&tar)?.len();
    let tree = dir.join("tree");
    fs::create_dir_all(&tree)?;
    run_tool(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(&tar)
            .arg("-C")
            .arg(&tree),
    )
    .context("extracting the tree for mksquashfs (needs root for owners)")?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string();
    let (k_sq, m_sq) = (dir.join("kiln.squashfs"), dir.join("mksquashfs.squashfs"));
    let (mut ks, mut ms) = (vec![], vec![]);
    for _ in 0..runs {
        ks.push(time_it(|| {
            emit::squashfs_from_tar(&tar, &k_sq, sde, None).map(drop)
        })?);
        ms.push(time_it(|| {
            run_tool(
                Command::new("mksquashfs")
                    .arg(&tree)
                    .arg(&m_sq)
                    .args(["-noappend", "-quiet", "-no-progress", "-comp", "zstd"])
                    .args([
                        "-Xcompression-level",
                        &emit::SQUASHFS_ZSTD_LEVEL.to_string(),
                    ])
                    .args(["-b", "1M", "-processors", &jobs])
                    .args([
                        "-mkfs-time",
                        &sde.to_string(),
                        "-all-time",
                        &sde.to_string(),
                    ]),
            )?;
            // kiln fsyncs what it writes (artifacts are published durable): so does the reference.
            util::sync_path(&m_sq)
        })?);
    }
    let (ksz, msz) = (fs::metadata(&k_sq)?.len(), fs::metadata(&m_sq)?.len());
    let mut r = Row::timed(
        "compress",
        format!(
            "squashfs: kiln (own writer, zstd {}, 1 MiB blocks, cold) from the {} tar",
            emit::SQUASHFS_ZSTD_LEVEL,
            util::human_bytes(tar_size)
        ),
        ks,
    );
    r.detail = format!("size {}", util::human_bytes(ksz));
    let km = r.median_seconds.unwrap_or(0.0);
    let mut m = Row::timed(
        "compress",
        "squashfs: mksquashfs on the extracted tree, same settings",
        ms,
    );
    m.detail = format!("size {}", util::human_bytes(msz));
    let mm = m.median_seconds.unwrap_or(0.0);
    let mut ratio = Row::note(
        "compress",
        "squashfs speed: mksquashfs time / kiln time",
        format!(
            "size kiln/mksquashfs {:.3}; cpu mksquashfs/kiln {:.2}",
            ksz as f64 / msz.max(1) as f64,
            m.median_cpu_seconds.unwrap_or(0.0) / r.median_cpu_seconds.unwrap_or(1.0).max(0.01)
        ),
    );
    ratio.target = Some(format!("≥ {TARGET_COMPRESS_RATIO}"));
    if km > 0.0 {
        ratio.ratio = Some(round2(mm / km));
        ratio.met = Some(mm / km >= TARGET_COMPRESS_RATIO);
    }
    rows.extend([r, m, ratio]);

    let (k_z, z_z) = (dir.join("kiln.tar.zst"), dir.join("zstd.tar.zst"));
    let (mut kz, mut zz) = (vec![], vec![]);
    for _ in 0..runs {
        kz.push(time_it(|| emit::compress_tar(&tar, &k_z, None).map(drop))?);
        zz.push(time_it(|| {
            run_tool(
                Command::new("zstd")
                    .args([
                        &format!("-{}", emit::ZSTD_LEVEL),
                        "-T0",
                        "-q",
                        "-f",
                        "--check",
                    ])
                    .arg(&tar)
                    .arg("-o")
                    .arg(&z_z),
            )?;
            util::sync_path(&z_z)
        })?);
    }
    let (kzs, zzs) = (fs::metadata(&k_z)?.len(), fs::metadata(&z_z)?.len());
    let mut r = Row::timed(
        "compress",
        format!(
            "zstd: kiln rootfs.tar.zst (level {}, ~4 MiB frames, cold)",
            emit::ZSTD_LEVEL
        ),
        kz,
    );
    r.detail = format!("size {}", util::human_bytes(kzs));
    let km = r.median_seconds.unwrap_or(0.0);
    let mut z = Row::timed(
        "compress",
        format!("zstd: zstd -{} -T0 on the same tar", emit::ZSTD_LEVEL),
        zz,
    );
    z.detail = format!("size {}", util::human_bytes(zzs));
    let zm = z.median_seconds.unwrap_or(0.0);
    let mut ratio = Row::note(
        "compress",
        "zstd speed: zstd -T0 time / kiln time",
        format!(
            "size kiln/zstd {:.3}; cpu zstd/kiln {:.2}",
            kzs as f64 / zzs.max(1) as f64,
            z.median_cpu_seconds.unwrap_or(0.0) / r.median_cpu_seconds.unwrap_or(1.0).max(0.01)
        ),
    );
    ratio.target = Some(format!("≥ {TARGET_COMPRESS_RATIO}"));
    if km > 0.0 {
        ratio.ratio = Some(round2(zm / km));
        ratio.met = Some(zm / km >= TARGET_COMPRESS_RATIO);
    }
    rows.extend([r, z, ratio]);
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
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

/// Sizes of the files a PXE client fetches (a worker build's kernel, initrd and root.squashfs).
const PXE_FILES: [(&str, usize); 3] = [
    ("vmlinuz", 8_247_232),
    ("initrd.img", 42_393_027),
    ("root.squashfs", 237_240_320),
];
const PXE_CLIENTS: usize = 32;
const PXE_TFTP_BYTES: usize = 8 << 20;
const PXE_TFTP_BLKSIZE: usize = 1468;
const PXE_BUILD_ID: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// Reproducible filler (xorshift): incompressible like a squashfs, no RNG state.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// CPU seconds (user + system) a live process has used so far, from /proc/<pid>/stat.
fn process_cpu(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = crate::sys::os::clock_ticks_per_second();
    Some(ticks / hz.max(1.0))
}

/// `kiln serve` started for the PXE part; stopped (SIGTERM, then SIGKILL) when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        crate::sys::os::terminate(self.0.id());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fetches `name` over TFTP (RFC 1350 + blksize 2348 + windowsize 7440); returns the bytes.
fn tftp_fetch(server: std::net::SocketAddr, name: &str, window: u16) -> Result<usize> {
    use std::net::UdpSocket;
    let sock = UdpSocket::bind("127.0.0.1:0").context("TFTP client socket")?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut req = vec![0, 1];
    for s in [
        name,
        "octet",
        "blksize",
        &PXE_TFTP_BLKSIZE.to_string(),
        "windowsize",
        &window.to_string(),
    ] {
        req.extend_from_slice(s.as_bytes());
        req.push(0);
    }
    sock.send_to(&req, server)?;
    let mut buf = vec![0u8; PXE_TFTP_BLKSIZE + 4];
    let mut expected: u16 = 1;
    let mut total = 0;
    loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("TFTP: no packet from {server} for 10 s"))?;
        anyhow::ensure!(n >= 4, "TFTP: short packet from {from}");
        match buf[1] {
            6 => {
                sock.send_to(&[0, 4, 0, 0], from)?;
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block != expected {
                    continue;
                }
                total += n - 4;
                let last = n - 4 < PXE_TFTP_BLKSIZE;
                if last || block.is_multiple_of(window) {
                    let b = block.to_be_bytes();
                    sock.send_to(&[0, 4, b[0], b[1]], from)?;
                }
                expected = expected.wrapping_add(1);
                if last {
                    return Ok(total);
                }
            }
            _ => bail!(
                "TFTP error from kiln serve: {}",
                String::from_utf8_lossy(&buf[4..n])
            ),
        }
    }
}

/// The PXE part: `exe serve` on loopback with a signed build of a worker's real sizes (random
/// bytes: serving does not look inside), 32 concurrent HTTP clients each fetching kernel, initrd
/// and root.squashfs, and an 8 MiB TFTP transfer with windowsize 1, 4 and 16. `scale` divides
/// the file sizes (tests only).
pub fn pxe(
    project_dir: &Path,
    exe: &Path,
    work: &Path,
    role: &str,
    runs: usize,
    scale: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    use std::io::{BufRead, Read};
    let project = work.join("pxe-project");
    crate::pipeline::reproduce::copy_project(project_dir, &project)?;
    // A key of the bench's own signs the stand-in build (the project's keys stay untouched).
    let layout = Layout::new(&project);
    fs::create_dir_all(layout.keys())?;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (_, public) = crate::trust::keys::encode_signing_key(&key)?;
    util::write_atomic(&layout.key(key::VERIFYING_KEY), public.as_bytes())?;
    let out = Out::new(layout.default_out());
    let dir = out.build(role, PXE_BUILD_ID);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scale = scale.max(1);
    let sizes: Vec<(&str, usize)> = PXE_FILES.iter().map(|(n, l)| (*n, l / scale)).collect();
    for (i, (n, len)) in sizes.iter().enumerate() {
        fs::write(dir.join(n), noise(*len, i as u64 + 1))?;
    }
    fs::write(
        dir.join("manifest.json"),
        br#"{"kernel":{"cmdline":"boot=live console=ttyS0"}}"#,
    )?;
    let arts = crate::trust::sums::hash_artifacts(
        &dir,
        &["vmlinuz", "initrd.img", "root.squashfs", "manifest.json"],
    )?;
    fs::write(dir.join("SHA256SUMS"), crate::trust::sums::sha256sums(&arts))?;
    crate::trust::sign::sign_dir(&dir, &key)?;
    std::os::unix::fs::symlink(PXE_BUILD_ID, out.latest(role))?;
    let ipxe = work.join("pxe-tftp");
    fs::create_dir_all(&ipxe)?;
    let tftp_bytes = PXE_TFTP_BYTES / scale;
    fs::write(ipxe.join("big.bin"), noise(tftp_bytes, 9))?;

    let mut child = Command::new(exe)
        .arg("--dir")
        .arg(&project)
        .args([
            "serve",
            "--json",
            "--listen",
            "127.0.0.1",
            "--http-port",
            "0",
            "--tftp-port",
            "0",
            "--dhcp",
            "off",
            "--default-role",
            role,
            "--ipxe-dir",
        ])
        .arg(&ipxe)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} serve", exe.display()))?;
    let stdout = child.stdout.take().context("kiln serve stdout")?;
    let server = Server(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let status: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("kiln serve did not start (said {line:?})"))?;
    let http = status["http"]
        .as_str()
        .context("no http address")?
        .to_string();
    let tftp: std::net::SocketAddr = status["tftp"]
        .as_str()
        .context("no tftp address")?
        .parse()?;
    let per_client: usize = sizes.iter().map(|(_, l)| l).sum();
    let pid = server.0.id();
    // CPU of this process (the clients) and of kiln serve.
    let cpu_both = || cpu_now() + process_cpu(pid).unwrap_or(f64::NAN);

    // 1. 32 concurrent HTTP clients.
    let (mut times, mut agg, mut p50, mut slowest) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let cpu0 = cpu_both();
        let t0 = Instant::now();
        let res: Vec<Result<(usize, f64)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..PXE_CLIENTS)
                .map(|_| {
                    let (http, sizes) = (&http, &sizes);
                    s.spawn(move || -> Result<(usize, f64)> {
                        let c = reqwest::blocking::Client::builder()
                            .timeout(std::time::Duration::from_secs(600))
                            .build()?;
                        let t = Instant::now();
                        let mut got = 0;
                        let mut buf = vec![0u8; 1 << 20];
                        for (n, _) in sizes {
                            let url = format!("http://{http}/roles/{role}/{PXE_BUILD_ID}/{n}");
                            let mut r = c.get(&url).send()?.error_for_status()?;
                            loop {
                                let k = r.read(&mut buf)?;
                                if k == 0 {
                                    break;
                                }
                                got += k;
                            }
                        }
                        Ok((got, t.elapsed().as_secs_f64()))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
                })
                .collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_both() - cpu0;
        let res = res.into_iter().collect::<Result<Vec<_>>>()?;
        anyhow::ensure!(
            res.iter().all(|(g, _)| *g == per_client),
            "a PXE HTTP client got fewer bytes than were served"
        );
        let mut t: Vec<f64> = res.iter().map(|(_, t)| *t).collect();
        t.sort_by(f64::total_cmp);
        agg.push((PXE_CLIENTS * per_client) as f64 / wall / 1e6);
        p50.push(median(&t).unwrap_or(0.0));
        slowest.push(*t.last().unwrap_or(&0.0));
        times.push(Timing { wall, cpu });
    }
    let mut r = Row::timed(
        "pxe",
        format!(
            "HTTP: {PXE_CLIENTS} clients × kernel+initrd+squashfs ({:.0} MB each)",
            per_client as f64 / 1e6
        ),
        times,
    );
    r.detail = format!(
        "{:.0} MB/s aggregate; per client median {:.1} s, slowest {:.1} s (cpu: kiln serve and the clients)",
        median(&agg).unwrap_or(0.0),
        median(&p50).unwrap_or(0.0),
        median(&slowest).unwrap_or(0.0)
    );
    rows.push(r);

    // 2. TFTP with and without windowsize.
    let mut base = 0.0;
    for w in [1u16, 4, 16] {
        let mut times = vec![];
        let mut speeds = vec![];
        for _ in 0..runs.max(3) {
            let cpu0 = cpu_both();
            let t = Instant::now();
            let n = tftp_fetch(tftp, "big.bin", w)?;
            let wall = t.elapsed().as_secs_f64();
            anyhow::ensure!(n == tftp_bytes, "TFTP: got {n} bytes of {tftp_bytes}");
            let cpu = cpu_both() - cpu0;
            times.push(Timing { wall, cpu });
            speeds.push(n as f64 / wall / 1e6);
        }
        let m = median(&speeds).unwrap_or(0.0);
        if w == 1 {
            base = m;
        }
        let mut r = Row::timed(
            "pxe",
            format!(
                "TFTP: {:.1} MiB, blksize {PXE_TFTP_BLKSIZE}, windowsize {w}",
                tftp_bytes as f64 / 1048576.0
            ),
            times,
        );
        r.detail = format!("{m:.1} MB/s");
        if w > 1 && base > 0.0 {
            r.detail.push_str(" (value: speed / windowsize 1)");
            r.ratio = Some(round2(m / base));
        }
        rows.push(r);
    }
    drop(server);
    Ok(())
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
