//! Putting builds on machines: [`flash`] (block devices, image files), [`serve`] (PXE:
//! ProxyDHCP, TFTP, HTTP) and [`proxmox`] (templates and clones through the PVE API).

pub mod drain;
pub mod flash;
pub mod proxmox;
pub mod reflash;
pub mod rollout;
pub mod serve;
