//! Which bases to build and in what order; roles start as their base becomes ready.

use super::*;

/// The bases `roles` need that are not in the cache, one entry per distinct base in the order
/// of the roles needing them; roles already built (and not forced) need none.
pub fn missing_bases<'a>(
    roles: &'a [Resolved],
    opts: &BuildOptions,
) -> Vec<(String, Vec<&'a Resolved>)> {
    let mut missing: Vec<(String, Vec<&Resolved>)> = Vec::new();
    for r in roles {
        let built = opts.out_dir.join(&r.role).join(&r.build_id);
        if !opts.force
            && built.join("SHA256SUMS").is_file()
            && built.join("SHA256SUMS.sig").is_file()
        {
            continue; // up to date: its role build needs no base
        }
        // The cache entry is named by the cache key (the spec plus this host's mmdebstrap and
        // apt sources); when that cannot be computed, the base stage will say why.
        let cached = r.base.cache_key().ok().is_some_and(|k| {
            let dir = crate::project::layout::Cache::new(&opts.cache_dir).base(&k);
            dir.join("rootfs.tar").is_file() && dir.join("spec.json").is_file()
        });
        if cached {
            continue;
        }
        match missing.iter_mut().find(|(k, _)| *k == r.base_key) {
            Some((_, rs)) => rs.push(r),
            None => missing.push((r.base_key.clone(), vec![r])),
        }
    }
    missing
}

/// Builds `roles`; the reports are in the order given. Their missing bases are built side by
/// side in the background (up to one per core, DKMS bases first, then in the order the roles
/// need them) while the roles are composed one after the other, each as soon as its base is
/// ready (a role whose base is still building lets the next ready one go first): on two cores,
/// worker+master+storage from an empty cache cost the two bases side by side, with the worker
/// and master composes overlapping the storage base. With a DKMS base (gpu) among them, the
/// other bases run at a lower CPU priority so that the longest one — the critical path — is
/// slowed as little as possible. A role whose base was built in this run
/// reports `base_cached: false`, as if its own base stage had built it; its base stage then
/// does not hash the base again. After a failed role, the bases being built are finished (an
/// mmdebstrap run is not interrupted) and no further one is started.
pub fn build_roles(
    project: &Project,
    roles: &[Resolved],
    opts: &BuildOptions,
    mut each: impl FnMut(&BuildReport),
) -> Result<Vec<BuildReport>> {
    let todo = bases_to_build(roles, opts);
    if todo.is_empty() {
        return build_in_order(project, roles, opts, each);
    }
    let at_once = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(2)
        .min(todo.len());
    let bar = bases_bar(&todo, at_once);
    let queue = BaseQueue::new(&todo);
    let (tx, rx) = std::sync::mpsc::channel::<(String, Result<()>)>();
    let result = std::thread::scope(|s| {
        for _ in 0..at_once {
            let (tx, queue) = (tx.clone(), &queue);
            s.spawn(move || queue.build_bases(project, &opts.cache_dir, tx));
        }
        drop(tx);
        let r = build_as_bases_arrive(project, roles, opts, &queue, &rx, &mut each);
        if r.is_err() {
            queue.stop.store(true, Ordering::SeqCst);
        }
        r
    });
    bar.finish_and_clear();
    result
}

/// The missing bases to build in the background (none offline), longest first.
pub(super) fn bases_to_build<'a>(
    roles: &'a [Resolved],
    opts: &BuildOptions,
) -> Vec<(String, Vec<&'a Resolved>)> {
    let mut todo = if opts.offline {
        Vec::new()
    } else {
        missing_bases(roles, opts)
    };
    // Longest first: a base whose DKMS compiles kernel modules (sign_modules; the gpu role's
    // NVIDIA driver) takes several times longer than the others, so it starts at once and the
    // other core works through the rest meanwhile (stable: otherwise in role order).
    todo.sort_by_key(|(_, rs)| rs[0].base.module_signing_cert.is_none());
    todo
}

/// Builds the roles one after the other when no base is to be built first.
pub(super) fn build_in_order(
    project: &Project,
    roles: &[Resolved],
    opts: &BuildOptions,
    mut each: impl FnMut(&BuildReport),
) -> Result<Vec<BuildReport>> {
    let mut reports = Vec::new();
    for r in roles {
        let rep = build_role(project, r, opts)?;
        each(&rep);
        reports.push(rep);
    }
    Ok(reports)
}

/// The progress line of the bases built in the background.
pub(super) fn bases_bar(todo: &[(String, Vec<&Resolved>)], at_once: usize) -> ProgressBar {
    let bar = progress().add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] bases: {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!(
        "building {} base(s), {} at a time, for {}",
        todo.len(),
        at_once,
        todo.iter()
            .flat_map(|(_, rs)| rs.iter().map(|r| r.role.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    bar
}

/// The bases built in the background, taken in order by the builder threads.
pub(super) struct BaseQueue<'a> {
    todo: &'a [(String, Vec<&'a Resolved>)],
    next: AtomicUsize,
    /// The first base compiles modules with DKMS and others follow it.
    critical_first: bool,
    /// Set when a role fails: builders take no further base (those running finish).
    stop: AtomicBool,
}

impl<'a> BaseQueue<'a> {
    fn new(todo: &'a [(String, Vec<&'a Resolved>)]) -> Self {
        BaseQueue {
            todo,
            next: AtomicUsize::new(0),
            critical_first: todo.len() > 1 && todo[0].1[0].base.module_signing_cert.is_some(),
            stop: AtomicBool::new(false),
        }
    }

    /// Whether the base `key` is built here (the roles needing it wait for it).
    fn builds(&self, key: &str) -> bool {
        self.todo.iter().any(|(t, _)| t == key)
    }

    /// One builder thread: takes the next base until none is left or a role failed, and sends
    /// each result.
    fn build_bases(
        &self,
        project: &Project,
        cache_dir: &Path,
        tx: std::sync::mpsc::Sender<(String, Result<()>)>,
    ) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let idx = self.next.fetch_add(1, Ordering::SeqCst);
            let Some((key, rs)) = self.todo.get(idx) else {
                break;
            };
            if idx > 0 && self.critical_first {
                // The DKMS base is the critical path of the whole build: the other bases
                // (and their mmdebstrap, dpkg, compilers) yield the CPU to it and use what
                // it leaves idle (its unpacking and linking phases are single-threaded).
                crate::sys::os::lower_thread_priority(10);
            }
            let t = Instant::now();
            let built = base_of(project, rs[0], cache_dir, false)
                .map(|_| ())
                .with_context(|| format!("base stage failed for role {}", rs[0].role));
            tracing::info!(
                roles = %rs.iter().map(|r| r.role.as_str()).collect::<Vec<_>>().join(","),
                seconds = format!("{:.1}", t.elapsed().as_secs_f64()),
                "base built"
            );
            if tx.send((key.clone(), built)).is_err() {
                break;
            }
        }
    }
}

/// Builds the roles while `queue`'s bases arrive on `rx`; the reports are in the order of
/// `roles`.
pub(super) fn build_as_bases_arrive(
    project: &Project,
    roles: &[Resolved],
    opts: &BuildOptions,
    queue: &BaseQueue,
    rx: &std::sync::mpsc::Receiver<(String, Result<()>)>,
    each: &mut impl FnMut(&BuildReport),
) -> Result<Vec<BuildReport>> {
    // Results of the bases built here, by key, as they arrive.
    let mut ready: BTreeMap<String, Result<()>> = BTreeMap::new();
    let mut done: Vec<Option<BuildReport>> = roles.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..roles.len()).collect();
    while !pending.is_empty() {
        // The first role (in the given order) whose base is ready: a role waiting for a
        // long base (gpu, listed first by name) does not hold up the others.
        let pick = pending.iter().position(|&i| {
            let k = &roles[i].base_key;
            !queue.builds(k) || ready.contains_key(k)
        });
        let Some(pos) = pick else {
            let (k, res) = rx
                .recv()
                .context("internal: the base builders stopped early")?;
            ready.insert(k, res);
            continue;
        };
        let i = pending.remove(pos);
        let r = &roles[i];
        let prepared = ready.contains_key(&r.base_key);
        if let Some(Err(e)) = ready.remove(&r.base_key) {
            return Err(e);
        }
        if prepared {
            ready.insert(r.base_key.clone(), Ok(()));
        }
        let mut rep = build_role_inner(project, r, opts, prepared)?;
        if prepared && !rep.up_to_date {
            rep.base_cached = false;
        }
        each(&rep);
        done[i] = Some(rep);
    }
    Ok(done.into_iter().flatten().collect())
}

/// Where every progress line of a build is drawn (role stages and background bases at once).
pub(super) fn progress() -> &'static indicatif::MultiProgress {
    static P: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    P.get_or_init(indicatif::MultiProgress::new)
}
