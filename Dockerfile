# One image for the API, the workers and the CLI.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY service ./service
COPY search ./search
COPY trainer ./trainer
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[postgres]' optuna-dashboard
RUN useradd --create-home hptune
USER hptune
EXPOSE 8000
CMD ["hptune", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
