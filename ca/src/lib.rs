//! hybridge-ca library (being built).
