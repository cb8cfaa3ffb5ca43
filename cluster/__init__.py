"""Talking to Ray and to storage: embedded or remote Ray, object storage, local dev services, job submission."""
