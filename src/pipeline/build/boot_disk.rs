//! The role disk: GPT layout (GUIDs from the build id), kernel command line, ESP files.

use super::*;

/// Size of the seed slot (partition 3) of every role disk; per-node disks put their cloud-init
/// `CIDATA` volume there.
pub const SEED_PARTITION_MIB: u64 = 4;

/// Partition GUIDs derived from the build id: stable across rebuilds, distinct per build.
pub fn disk_layout(r: &Resolved) -> disk::DiskLayout {
    let seed = r.build_id.as_bytes();
    disk::DiskLayout {
        disk_guid: disk::guid_from_seed(seed, "disk"),
        esp_guid: disk::guid_from_seed(seed, "esp"),
        root_guid: disk::guid_from_seed(seed, "root"),
        esp_size_mib: r.recipe.boot.esp_size_mib,
        esp_label: "KILN-ESP".into(),
        esp_volume_id: u32::from_be_bytes(
            disk::guid_from_seed(seed, "esp-volume-id")[..4]
                .try_into()
                .expect("4 bytes"),
        ),
        root_partition_name: "kiln-root".into(),
        seed_size_mib: SEED_PARTITION_MIB,
        seed_guid: disk::guid_from_seed(seed, "seed"),
    }
}

/// Kernel command line for booting the disk: live-boot mounts the squashfs partition as the
/// read-only lower layer with a tmpfs overlay (`plainroot`). live-boot takes `root=` verbatim
/// (no `PARTUUID=` resolution), so the udev by-partuuid path is given.
pub fn kernel_cmdline(r: &Resolved, root_partuuid: &str) -> String {
    let mut args = vec![
        "boot=live".to_string(),
        "plainroot".into(),
        format!("root=/dev/disk/by-partuuid/{root_partuuid}"),
    ];
    args.extend(r.recipe.boot.cmdline.iter().cloned());
    args.join(" ")
}

pub(super) fn esp_files(r: &Resolved, c: &compose::Composed, cmdline: &str) -> Vec<disk::EspFile> {
    let b = |path: &str, data: Vec<u8>| disk::EspFile {
        path: path.into(),
        source: disk::EspSource::Bytes(data),
    };
    let entry = format!(
        "title kiln {} {} ({})\nlinux /kiln/vmlinuz\ninitrd /kiln/initrd.img\noptions {}\n",
        r.cluster.section.name,
        r.role,
        r.build_id.short(),
        cmdline
    );
    vec![
        b("EFI/BOOT/BOOTX64.EFI", c.bootloader_efi.clone()),
        b("kiln/initrd.img", c.initrd.clone()),
        b("kiln/vmlinuz", c.vmlinuz.clone()),
        b("loader/entries/kiln.conf", entry.into_bytes()),
        b(
            "loader/loader.conf",
            b"default kiln.conf\ntimeout 0\neditor no\n".to_vec(),
        ),
    ]
}
