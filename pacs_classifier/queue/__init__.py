"""The job queue: classification jobs in the database, claimed in batches under a lease."""
