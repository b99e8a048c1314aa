//! Slow test: the gpu role built for real — Debian's nvidia-driver compiled by DKMS in the base
//! for the image's kernel and signed with the project's module-signing key, plus pinned `.deb`
//! files for the NVIDIA container toolkit (stand-ins from tests/standin/nvidia/, made by
//! make-nvidia-debs.sh: NVIDIA's packages cannot be downloaded here) served over HTTP with their
//! sha256 pinned, exactly as the repository's gpu.toml pins NVIDIA's own. Then `kiln verify
//! --rebuild` makes it again from a fresh cache and every artifact must be identical.
//!
//! Needs root, mmdebstrap, tar2sqfs, qemu-img (the build) and openssl (the signature check);
//! missing ones print `SKIP: <reason>`. The gpu base (~1.6 GB of packages, a DKMS compile) is
//! cached in the shared test cache like the other bases.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const STANDIN_DEBS: &[&str] = &[
    "libnvidia-container1_1.17.8-1_amd64.deb",
    "libnvidia-container-tools_1.17.8-1_amd64.deb",
    "nvidia-container-toolkit-base_1.17.8-1_amd64.deb",
    "nvidia-container-toolkit_1.17.8-1_amd64.deb",
];

/// Replaces the `[[debian.debs]]` pins of gpu.toml with the stand-ins served at `url`.
fn pin_standin_debs(project: &Path, url: &str) {
    let p = project.join("recipes/gpu.toml");
    let s = fs::read_to_string(&p).unwrap();
    let start = s.find("[[debian.debs]]").expect("gpu.toml pins .deb files");
    let end = s.find("[k3s]").expect("gpu.toml has [k3s]");
    assert!(start < end);
    let mut pins = String::new();
    for f in STANDIN_DEBS {
        let bytes = fs::read(repo_root().join("tests/standin/nvidia").join(f)).unwrap();
        pins.push_str(&format!(
            "[[debian.debs]]\nurl = \"{url}/{f}\"\nsha256 = \"{}\"\nsize = {}\n\n",
            sha256_hex(&bytes),
            bytes.len()
        ));
    }
    fs::write(&p, format!("{}{pins}{}", &s[..start], &s[end..])).unwrap();
}

/// Splits a signed kernel module into (signed content, PKCS#7 DER) — the trailer sign-file
/// appends: signature, `struct module_signature` (12 bytes, big-endian length last), magic.
fn split_module_signature(ko: &[u8]) -> Option<(&[u8], &[u8])> {
    const MAGIC: &[u8] = b"~Module signature appended~\n";
    let body = ko.strip_suffix(MAGIC)?;
    let (rest, info) = body.split_at(body.len().checked_sub(12)?);
    if info[2] != 2 {
        return None; // id_type 2 = PKCS#7
    }
    let sig_len = u32::from_be_bytes(info[8..12].try_into().unwrap()) as usize;
    let (content, sig) = rest.split_at(rest.len().checked_sub(sig_len)?);
    Some((content, sig))
}

fn openssl_verify(dir: &Path, content: &[u8], sig: &[u8], cert: &Path) -> (bool, String) {
    let (c, s) = (dir.join("content"), dir.join("sig.p7"));
    fs::write(&c, content).unwrap();
    fs::write(&s, sig).unwrap();
    let o = Command::new("openssl")
        .args([
            "cms",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-nointern",
            "-noverify",
        ])
        .arg("-in")
        .arg(&s)
        .arg("-content")
        .arg(&c)
        .arg("-certfile")
        .arg(cert)
        .args(["-out", "/dev/null"])
        .output()
        .unwrap();
    (o.status.success(), stderr(&o))
}

/// Whether the decompressed `rootfs.tar.zst` contains `needle` anywhere.
fn stream_contains(zst: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let mut r = zstd::stream::read::Decoder::new(fs::File::open(zst).unwrap()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return false;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = carry.len().min(needle.len() - 1);
        carry.drain(..carry.len() - keep);
    }
}

#[test]
fn slow_gpu_role_signed_modules_and_container_toolkit() {
    const T: &str = "slow_gpu_role_signed_modules_and_container_toolkit";
    if let Some(r) = missing_build_capability() {
        return skip(T, &r);
    }
    if !which("openssl") {
        return skip(T, "openssl not installed (apt-get install openssl)");
    }
    let root = repo_root().join("target/kiln-gpu-out");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    remove_on_success(&root);
    let mut files = standin_files();
    for f in STANDIN_DEBS {
        files.push((
            f.to_string(),
            fs::read(repo_root().join("tests/standin/nvidia").join(f)).unwrap(),
        ));
    }
    let (url, _) = serve(files);
    let project = root.join("project");
    populate(&project);
    pin_standin(&project, &url);
    pin_standin_debs(&project, &url);
    let out = root.join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--dir")
        .arg(&project)
        .arg("--out")
        .arg(&out)
        .args(["build", "--json", "--role", "gpu", "--cache-dir"])
        .arg(shared_cache())
        .output()
        .unwrap();
    assert!(o.status.success(), "gpu build failed:\n{}", stderr(&o));

    // kiln.lock records the pinned .deb files like every other artifact.
    let lock = fs::read_to_string(project.join("kiln.lock")).unwrap();
    for f in STANDIN_DEBS {
        assert!(lock.contains(&format!("[artifacts.\"deb/{f}\"]")), "{lock}");
    }

    let dir = fs::canonicalize(out.join("gpu/latest")).unwrap();
    let tree = root.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let x = Command::new("tar")
        .arg("--zstd")
        .arg("-xf")
        .arg(dir.join("rootfs.tar.zst"))
        .arg("-C")
        .arg(&tree)
        .args([
            "--wildcards",
            "usr/lib/modules/*/updates/*",
            "var/lib/dkms/*",
            "var/lib/dpkg/status",
            "usr/bin/nvidia-*",
            "etc/nvidia-container-runtime/*",
            "etc/rancher/*",
            "boot/*",
        ])
        .output()
        .unwrap();
    assert!(x.status.success(), "extracting: {}", stderr(&x));

    // 1. The NVIDIA container toolkit from the pinned .debs, installed by dpkg with its
    //    dependencies from the archive (libseccomp2 is not in the other roles' bases).
    let status = fs::read_to_string(tree.join("var/lib/dpkg/status")).unwrap();
    let installed = kiln::pipeline::base::parse_dpkg_status(&status);
    for name in [
        "libnvidia-container1",
        "libnvidia-container-tools",
        "nvidia-container-toolkit-base",
        "nvidia-container-toolkit",
    ] {
        let p = installed
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name} not installed"));
        assert_eq!(p.version, "1.17.8-1", "{name}");
    }
    assert!(installed.iter().any(|p| p.name == "libseccomp2"));
    assert!(installed.iter().any(|p| p.name == "nvidia-driver"));
    use std::os::unix::fs::PermissionsExt;
    // What k3s looks for to register the `nvidia` containerd runtime.
    let rt = tree.join("usr/bin/nvidia-container-runtime");
    assert_eq!(
        fs::metadata(&rt).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert!(fs::read_to_string(&rt).unwrap().contains("kiln-standin"));
    // Made by the package's postinst inside the chroot.
    assert!(
        fs::read_to_string(tree.join("etc/nvidia-container-runtime/config.toml"))
            .unwrap()
            .contains("postinst")
    );

    // 2. DKMS signed with the project key; only the certificate is in the image.
    assert!(
        !tree.join("var/lib/dkms/mok.key").exists(),
        "the module-signing private key is in the image"
    );
    let cert_pem = project.join("keys/module-signing.crt");
    let cert_der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&cert_pem)
        .output()
        .unwrap();
    assert!(cert_der.status.success());
    assert_eq!(
        fs::read(tree.join("var/lib/dkms/mok.pub")).unwrap(),
        cert_der.stdout,
        "/var/lib/dkms/mok.pub is not keys/module-signing.crt"
    );
    let logs: Vec<PathBuf> = walkdir::WalkDir::new(tree.join("var/lib/dkms"))
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() == "make.log")
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(
        logs.is_empty(),
        "DKMS build logs (with dates) left: {logs:?}"
    );

    // The modules are built for the image's own kernel.
    let kernels: Vec<String> = fs::read_dir(tree.join("boot"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    assert_eq!(kernels.len(), 1, "{kernels:?}");
    let mods = tree
        .join("usr/lib/modules")
        .join(&kernels[0])
        .join("updates");
    let kos: Vec<PathBuf> = walkdir::WalkDir::new(&mods)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ko"))
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(
        kos.iter().any(|k| k
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("nvidia")),
        "no NVIDIA module in {}: {kos:?}",
        mods.display()
    );
    let scratch = root.join("sig");
    fs::create_dir_all(&scratch).unwrap();
    for ko in &kos {
        let bytes = fs::read(ko).unwrap();
        let (content, sig) = split_module_signature(&bytes)
            .unwrap_or_else(|| panic!("{} carries no module signature", ko.display()));
        let (ok, err) = openssl_verify(&scratch, content, sig, &cert_pem);
        assert!(
            ok,
            "{}: signature does not verify with keys/module-signing.crt: {err}",
            ko.display()
        );
        // The check can fail: one flipped byte of the module and it does.
        let mut bad = content.to_vec();
        bad[content.len() / 2] ^= 1;
        assert!(!openssl_verify(&scratch, &bad, sig, &cert_pem).0);
    }

    // Nor is any copy of the private key anywhere in the image (a line of its PEM body).
    let pem = fs::read_to_string(project.join("keys/module-signing.key")).unwrap();
    let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let needle = body[body.len() / 2].as_bytes();
    assert!(
        !stream_contains(&dir.join("rootfs.tar.zst"), needle),
        "module-signing.key is in the gpu image"
    );

    // 3. The k3s agent registers with the GPU label and taint.
    let cfg = fs::read_to_string(tree.join("etc/rancher/k3s/config.yaml")).unwrap();
    assert!(cfg.contains("nvidia.com/gpu.present=true"), "{cfg}");
    assert!(cfg.contains("nvidia.com/gpu=present:NoSchedule"), "{cfg}");
    fs::remove_dir_all(&tree).unwrap();

    // 4. Bit-identical from scratch: `kiln verify --rebuild` makes the base again with
    //    mmdebstrap in a fresh cache (DKMS compiles and signs the modules again), copies the
    //    pinned artifacts from this cache after checking their sha256, and compares every
    //    artifact byte for byte.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--dir")
        .arg(&project)
        .args(["verify", "--rebuild", "--json", "--cache-dir"])
        .arg(shared_cache())
        .arg("--work-dir")
        .arg(root.join("rebuild"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "verify --rebuild of the gpu role: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["identical"], true, "{v}");
    let arts = v["artifacts"].as_array().unwrap();
    assert_eq!(
        arts.len(),
        kiln::pipeline::build::ARTIFACTS.len() + 2,
        "{arts:?}"
    );
    for a in arts {
        assert_eq!(a["result"], "same", "{a}");
    }
    for f in STANDIN_DEBS {
        assert!(
            v["artifacts_source"][format!("deb/{f}")]
                .as_str()
                .is_some_and(|s| s.starts_with("copied from")),
            "{v}"
        );
    }
    assert!(
        v["timings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t[0] == "base" && t[1].as_f64().unwrap() > 5.0),
        "the base was made again: {}",
        v["timings"]
    );
}
