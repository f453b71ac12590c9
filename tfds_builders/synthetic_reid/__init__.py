"""synthetic_reid: procedurally drawn people, the embedded default dataset."""
