//! iPXE scripts handed to machines by `/boot.ipxe`.
//!
//! A node's script loads the role build's kernel and initrd over HTTP and boots live-boot with
//! `fetch=` pointing at the same build's `root.squashfs`, so the diskless root is the exact tree
//! the disk image carries. A node with signed outputs also gets its NoCloud seed:
//! `ds=nocloud-net;s=<base>/nocloud/<mac>/` (cloud-init fetches meta-data, user-data and
//! vendor-data in its network stage; cloud-init 22.4 takes a plain `ds=nocloud` as local-only
//! and then ignores an HTTP seed)
//! and its network-config inline as `network-config=<base64>`, because cloud-init applies
//! network configuration only in its local stage, before a seed over HTTP can be read.

use super::catalog::{short, NodeBoot, RoleBuild};
use base64::Engine;

/// The URL path of a role build's file.
pub fn file_path(b: &RoleBuild, name: &str) -> String {
    format!("/roles/{}/{}/{name}", b.role, b.build_id)
}

/// `aa-bb-cc-dd-ee-ff`: the MAC as it appears in URLs.
pub fn mac_hyphen(mac: &str) -> String {
    mac.replace(':', "-")
}

/// Kernel command line for a diskless boot of `b` (without `initrd=`).
pub fn kernel_args(base: &str, b: &RoleBuild, node: Option<&NodeBoot>, mac: &str) -> Vec<String> {
    let mut args = vec![
        "boot=live".to_string(),
        format!("fetch={base}{}", file_path(b, "root.squashfs")),
        // live-boot and the kernel pick the NIC that booted (pxelinux's IPAPPEND 2 format).
        format!("BOOTIF=01-{}", mac_hyphen(mac)),
    ];
    args.extend(b.cmdline_args.iter().cloned());
    if let Some(n) = node.filter(|n| n.instance_id.is_some()) {
        args.push(format!(
            "ds=nocloud-net;s={base}/nocloud/{}/",
            mac_hyphen(&n.mac)
        ));
        if let Some(nc) = n.seed.get("network-config") {
            args.push(format!(
                "network-config={}",
                base64::engine::general_purpose::STANDARD.encode(nc)
            ));
        }
    }
    args
}

/// The script that boots `b` for `mac` (`node` when the MAC is an inventory node).
pub fn boot_script(base: &str, b: &RoleBuild, node: Option<&NodeBoot>, mac: &str) -> String {
    let who = match node {
        Some(n) => format!(
            "{} role={} build={} seed={}",
            n.hostname,
            b.role,
            short(&b.build_id),
            n.instance_id.as_deref().unwrap_or("none")
        ),
        None => format!(
            "{mac} (not in the inventory) role={} build={} seed=none",
            b.role,
            short(&b.build_id)
        ),
    };
    let args = kernel_args(base, b, node, mac).join(" ");
    format!(
        "#!ipxe\n\
         echo kiln: booting {who}\n\
         kernel {base}{kernel} initrd=initrd.img {args}\n\
         initrd --name initrd.img {base}{initrd}\n\
         boot\n",
        kernel = file_path(b, "vmlinuz"),
        initrd = file_path(b, "initrd.img"),
    )
}

/// The script for a MAC that cannot boot: says why, then gives the machine back to its firmware
/// (next boot device) after a pause.
pub fn not_provisioned(reason: &str) -> String {
    let reason: String = reason
        .chars()
        .map(|c| if c == '$' || c.is_control() { ' ' } else { c })
        .collect();
    format!(
        "#!ipxe\n\
         echo kiln: this machine is not provisioned: {reason}\n\
         sleep 10\n\
         exit 1\n"
    )
}

/// The script for `/boot.ipxe` without `?mac=`: ask again with this machine's MAC.
pub fn chain_script(base: &str) -> String {
    format!("#!ipxe\nchain {base}/boot.ipxe?mac=${{net0/mac:hexhyp}}\n")
}
