"""Saved files, one module each, with the one writer and the one reader of that file: the
model directory, the posterior, prediction catalogs and tables, Jacobian shards; plus atomic
writes and the provenance cards every output carries."""
