"""Work over datasets built on the engines: capture of per-token features into Parquet shards
(`datasets`), SAE quality (`evaluate`), linear probes and feature rewards (`probe`), SAE training
(`train`) and the HTML/SVG reports of the CLI (`report`)."""
