import { defineConfig } from '@playwright/test';

// The preview server's port: 4173, or PW_PORT when several checkouts test at once on one machine.
const port = Number(process.env.PW_PORT ?? 4173);

// UI tests against the built `dist` (run `npm run build` first; `npm test` does not build).
// The engine is mocked at the IPC boundary (tests/support/mock.ts). Debian's Chromium is used,
// offline: no browser is downloaded and nothing reaches the network.
export default defineConfig({
  testDir: 'tests',
  outputDir: 'test-results',
  workers: 2,
  fullyParallel: true,
  forbidOnly: !!process.env.CI,
  retries: 0,
  timeout: 30_000,
  expect: { timeout: 5_000 },
  reporter: process.env.CI ? [['list'], ['html', { open: 'never', outputFolder: 'playwright-report' }]] : 'list',
  use: {
    baseURL: `http://127.0.0.1:${port}`,
    viewport: { width: 1280, height: 800 },
    locale: 'ja-JP',
    timezoneId: 'Asia/Tokyo',
    screenshot: 'only-on-failure',
    trace: 'retain-on-failure',
    serviceWorkers: 'block',
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--disable-default-apps',
        '--disable-domain-reliability',
        '--no-pings',
      ],
    },
  },
  webServer: {
    command: `npx vite preview --port ${port} --strictPort --host 127.0.0.1`,
    url: `http://127.0.0.1:${port}`,
    // A server left on the port may serve another checkout's dist: set PW_REUSE=1 to use it anyway.
    reuseExistingServer: process.env.PW_REUSE === '1',
    timeout: 30_000,
  },
});
