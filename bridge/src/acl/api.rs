//! Admin routes (todo)
