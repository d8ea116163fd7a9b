"""Pure lifecycle decisions: state in, plan out."""
