//! The project's inputs: recipes and their merge, the inventory, overlays, referenced files,
//! `kiln.lock`, and [`layout::Layout`], the one place every path of a project is spelled.

pub mod confine;
pub mod copy;
pub mod error;
mod files;
pub mod inventory;
pub mod layout;
pub mod limits;
pub mod lock;
pub mod manifests;
pub mod names;
pub mod net;
pub mod overlays;
pub mod recipe;
pub mod template;
