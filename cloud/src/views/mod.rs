//! Declarative views: definitions ([`spec`]), aggregate state ([`agg`]) and
//! the streaming operator that maintains a view ([`operator`]).

pub mod agg;
pub mod defaults;
pub mod operator;
pub mod reference;
pub mod spec;
pub mod syntax;
pub mod table;
