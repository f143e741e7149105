# The scoring service: docker compose up -d (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mvpp ./mvpp
RUN pip install --no-cache-dir .
EXPOSE 8080
ENTRYPOINT ["mvpp", "serve", "--host", "0.0.0.0", "--port", "8080"]
