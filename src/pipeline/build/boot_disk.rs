//! The role disk: GPT layout (GUIDs from the build id), kernel command line, ESP files.

use super::*;

/// Size of the seed slot (partition 3) of every role disk; per-node disks put their cloud-init
/// `CIDATA` volume there.
pub const SEED_PARTITION_MIB: u64 = 4;

/// GPT name of the first root slot (partition 2), where every build's root.squashfs goes.
pub const ROOT_A_PARTITION_NAME: &str = "kiln-root-a";
/// GPT name of the second root slot (partition 4), made empty at first boot for A/B updates.
pub const ROOT_B_PARTITION_NAME: &str = "kiln-root-b";
/// GPT name of the data partition (partition 5, the rest of the disk), made at first boot.
pub const DATA_PARTITION_NAME: &str = "kiln-data";

/// The role's root.squashfs fits its root slot, or the recipe error says which key to raise.
pub fn check_root_slot(r: &Resolved, squashfs_len: u64) -> Result<()> {
    let slot = r.recipe.boot.root_slot_mib;
    if squashfs_len > slot * disk::MIB {
        let file = r
            .recipe
            .boot
            .root_slot_from
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("recipes/{}.toml", r.role)));
        return Err(crate::project::error::RecipeError::new(
            &file,
            "boot.root_slot_mib",
            format!(
                "root.squashfs of role {} is {} MiB, larger than its root slot of {slot} MiB",
                r.role,
                squashfs_len.div_ceil(disk::MIB)
            ),
            format!(
                "set [boot] root_slot_mib = {} (or more) in {} and reflash the role's nodes: the slot size is part of the disk layout",
                squashfs_len.div_ceil(disk::MIB).div_ceil(256) * 256,
                file.display()
            ),
        )
        .into());
    }
    Ok(())
}

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
        root_partition_name: ROOT_A_PARTITION_NAME.into(),
        root_slot_mib: r.recipe.boot.root_slot_mib,
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

/// The ESP directory of a root slot's kernel, initrd and `root.pieces` (`kiln/a`, `kiln/b`).
pub fn slot_dir(slot: char) -> String {
    format!("kiln/{slot}")
}

/// systemd-boot's `default`: the newest good `kiln-<generation>` entry. Entries sort newest
/// first by file name (version order) and entries whose boot counter ran out (`+0-N`) after
/// every good one, so a build that never passed its health check is only picked when nothing
/// else is left.
pub const LOADER_CONF: &str = "default kiln-*\ntimeout 0\neditor no\n";

/// The flashed build's entry: generation 1, slot A, no boot counter (there is nothing to fall
/// back to). Updates write `kiln-<generation+1>+<tries>.conf` for the other slot.
pub const FIRST_ENTRY: &str = "loader/entries/kiln-1.conf";

/// A boot entry for the kernel and initrd in `slot`'s ESP directory.
pub fn boot_entry(title: &str, slot: char, options: &str) -> String {
    let d = slot_dir(slot);
    format!("title {title}\nlinux /{d}/vmlinuz\ninitrd /{d}/initrd.img\noptions {options}\n")
}

/// The entry's title: cluster, role and short build id.
pub fn entry_title(r: &Resolved) -> String {
    format!(
        "kiln {} {} ({})",
        r.cluster.section.name,
        r.role,
        r.build_id.short()
    )
}

pub(super) fn esp_files(
    r: &Resolved,
    c: &compose::Composed,
    cmdline: &str,
    root_pieces: Vec<u8>,
) -> Vec<disk::EspFile> {
    let b = |path: &str, data: Vec<u8>| disk::EspFile {
        path: path.into(),
        source: disk::EspSource::Bytes(data),
    };
    let d = slot_dir('a');
    vec![
        b("EFI/BOOT/BOOTX64.EFI", c.bootloader_efi.clone()),
        b(&format!("{d}/initrd.img"), c.initrd.clone()),
        b(&format!("{d}/root.pieces"), root_pieces),
        b(&format!("{d}/vmlinuz"), c.vmlinuz.clone()),
        b(
            FIRST_ENTRY,
            boot_entry(&entry_title(r), 'a', cmdline).into_bytes(),
        ),
        b("loader/loader.conf", LOADER_CONF.as_bytes().to_vec()),
    ]
}
