//! Service ACLs: model, redb store, immutable snapshot, decision, declarative files, admin routes and CLI.
