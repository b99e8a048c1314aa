//! Byte-exact writers (and the readers their tests need) with no kiln policy: what goes in
//! decides every byte that comes out.

pub mod disk;
pub mod iso9660;
pub mod pieces;
pub mod reuse;
pub mod squashfs;
pub mod zstd_frames;
