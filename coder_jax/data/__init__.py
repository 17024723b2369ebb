"""Code data pipeline: corpora, tokenizer, FIM, packing, SeqIO tasks (TensorFlow imported lazily)."""
