// The recent jobs this browser ran or opened, kept in localStorage (newest first), their state
// refreshed with GetJob.

const KEY = "tilechain.recentJobs";
const KEEP = 30;

export interface RecentJob {
  id: string;
  label: string;   // the chain's example name, or its stage types
  started: string; // ISO time this browser first saw the job
  state: string;   // JobState name without the prefix: "RUNNING", "SUCCEEDED", ...; "UNKNOWN" when the gateway no longer knows it
  message?: string;
}

export function loadJobs(): RecentJob[] {
  try {
    const value = JSON.parse(localStorage.getItem(KEY) ?? "[]");
    return Array.isArray(value) ? value.filter((j) => typeof j?.id === "string") : [];
  } catch {
    return [];
  }
}

function save(jobs: RecentJob[]): void {
  try {
    localStorage.setItem(KEY, JSON.stringify(jobs.slice(0, KEEP)));
  } catch {
    // storage full or disabled: the list lives for this page only
  }
}

/** Add the job, or update it in place; returns the new list. */
export function rememberJob(job: Partial<RecentJob> & { id: string }): RecentJob[] {
  const jobs = loadJobs();
  const known = jobs.find((j) => j.id === job.id);
  if (known) Object.assign(known, Object.fromEntries(Object.entries(job).filter(([, v]) => v !== undefined)));
  else jobs.unshift({ label: "", started: new Date().toISOString(), state: "QUEUED", ...job });
  save(jobs);
  return jobs;
}

export function forgetJobs(): void {
  save([]);
}

export const FINAL_STATES = new Set(["SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN"]);
