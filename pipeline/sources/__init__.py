"""Candidate sources: search APIs, URL lists, folders and S3 prefixes that yield candidate image URLs per synset."""
