"""shopguide's ML steps: plain, typed Python that never imports Airflow."""
