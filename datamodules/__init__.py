"""WebDataset DataModules: the base stream (webdataset.py), one file per data kind, synth/ and convert/."""
