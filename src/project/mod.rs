//! The project's inputs: recipes and their merge, the inventory, overlays, referenced files,
//! `kiln.lock`, and [`layout::Layout`], the one place every path of a project is spelled.

pub mod layout;
pub mod lock;
pub mod recipe;
