//! The build pipeline, one module per stage; each takes the previous stage's value:
//! [`resolve`] (build id) → [`fetch`] → [`base`] (mmdebstrap) → [`compose`] (+ [`k3s`] layer)
//! → [`emit`] → publish, sequenced by [`build`]; then [`seed`] → [`node`] per inventory node.
//! [`cache`] keeps and prunes what the stages store; [`reproduce`] rebuilds a recorded build and
//! compares it byte for byte.

pub mod base;
pub mod build;
pub mod cache;
pub mod compose;
pub mod emit;
pub mod fetch;
pub mod k3s;
pub mod node;
pub mod reproduce;
pub mod resolve;
pub mod seed;
pub mod state;
pub mod update;
pub mod vip;
